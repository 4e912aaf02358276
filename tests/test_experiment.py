"""Checks of `run_experiment` that need the data but no training."""

import dataclasses
import logging

import pytest

from mixco_tf import experiment
from mixco_tf.config import Config, ConfigError
from mixco_tf.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_queue_near_train_size_is_flagged(digits, caplog):
    """1,437 images in batches of 32: 1,408 per epoch, so at most 1,376 other keys."""
    config = Config(batch_size=32, queue_size=1408, key_bn_splits=4)

    with caplog.at_level(logging.WARNING, logger="mixco_tf.experiment"):
        steps = experiment._check_data_fits_config(config, digits)

    assert steps == 44
    assert "queue_size=1408 is larger than the training set minus one batch" in caplog.text
    assert "at most 1376" in caplog.text


def test_queue_within_train_size_is_quiet(digits, caplog):
    config = Config(batch_size=32, queue_size=1376, key_bn_splits=4)

    with caplog.at_level(logging.WARNING, logger="mixco_tf.experiment"):
        experiment._check_data_fits_config(config, digits)

    assert "queue_size" not in caplog.text


def test_batch_larger_than_data_names_key(digits):
    config = Config(batch_size=2000, queue_size=2000)

    with pytest.raises(ConfigError, match=r"batch_size=2000: .* 1437 training images"):
        experiment._check_data_fits_config(config, digits)


def test_unknown_dataset_rejected_before_model_dir(tmp_path):
    config = dataclasses.replace(Config(), dataset="cifar11", model_dir=str(tmp_path / "run"))

    with pytest.raises(ConfigError, match=r"dataset='cifar11'.*'cifar10', 'cifar100', 'digits'"):
        experiment.run_experiment(config)

    assert not (tmp_path / "run").exists()


def test_pipeline_seed_changes_on_resume():
    assert experiment.pipeline_seed(5, 0) == 5
    resumed = {experiment.pipeline_seed(5, epoch) for epoch in (1, 2, 3)}
    assert len(resumed) == 3
    assert 5 not in resumed
    assert experiment.pipeline_seed(5, 2) == experiment.pipeline_seed(5, 2)


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_learning_rate_schedule_matches_numpy(warmup_epochs):
    """Linear warm-up from 0 to the peak, then a cosine to 0, per optimizer step."""
    import numpy as np

    config = dataclasses.replace(Config(), epochs=5, learning_rate=0.3, warmup_epochs=warmup_epochs)
    steps_per_epoch = 4
    total = config.epochs * steps_per_epoch
    warmup = warmup_epochs * steps_per_epoch
    schedule = experiment.build_learning_rate_schedule(config, steps_per_epoch)

    def numpy_learning_rate(step):
        if step < warmup:
            return 0.3 * step / warmup
        progress = (step - warmup) / (total - warmup)
        return 0.3 * 0.5 * (1.0 + np.cos(np.pi * progress))

    for step in range(total + 1):
        np.testing.assert_allclose(float(schedule(step)), numpy_learning_rate(step), rtol=1e-5, atol=1e-7)
