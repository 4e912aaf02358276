"""All four methods through the one training path on digits: a few steps each, and beta = 0."""

import dataclasses

import keras
import numpy as np
import pytest

from mixco_tf import augment, checkpointing, experiment
from mixco_tf import config as config_lib
from mixco_tf.data import load_dataset
from mixco_tf.models import MixCo, SimCLR

STEPS = 3


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _config(method, **overrides):
    values = dict(
        method=method, batch_size=32, queue_size=64, key_bn_splits=4, width_multiplier=0.0625,
        image_size=16, epochs=1, warmup_epochs=0, **overrides,
    )
    return config_lib.from_dict(values).validate()


def _train(config, digits, steps=STEPS):
    """Builds the config's model with its seed, trains `steps` steps on digits; returns (model, history)."""
    keras.utils.set_random_seed(config.seed)
    model = experiment.build_model(config)
    model.compile(optimizer=experiment.build_optimizer(config, steps_per_epoch=steps))
    views = augment.two_view_dataset(
        digits.train, image_size=config.image_size, mean=digits.mean, std=digits.std,
        batch_size=config.batch_size, config=experiment.augment_config(config), seed=config.seed,
    )
    history = model.fit(views.take(steps), epochs=1, verbose=0)
    return model, history


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, model_class, loss_key, mixes",
    [
        ("mixco", MixCo, "moco_loss", True),
        ("moco", MixCo, "moco_loss", False),
        ("simclr_mixco", SimCLR, "nt_xent_loss", True),
        ("simclr", SimCLR, "nt_xent_loss", False),
    ],
)
def test_method_trains_on_digits(digits, method, model_class, loss_key, mixes):
    config = _config(method)
    keras.utils.set_random_seed(config.seed)
    initial = [w.numpy() for w in experiment.build_model(config).backbone.trainable_weights]

    model, history = _train(config, digits)

    assert isinstance(model, model_class)
    assert set(history.history) == {"loss", loss_key, "mix_loss", "top1"}
    assert np.isfinite(history.history["loss"][-1])
    assert (history.history["mix_loss"][-1] > 0) == mixes
    moved = [np.abs(w.numpy() - w0).max() for w, w0 in zip(model.backbone.trainable_weights, initial)]
    assert max(moved) > 0, "the backbone did not train"


@pytest.mark.parametrize("variant, base", sorted(config_lib.BASE_METHODS.items()))
def test_zero_mix_weight_equals_base_method(digits, variant, base):
    """A MixCo variant with mix_weight = 0 trains exactly like its base method."""
    variant_model, variant_history = _train(_config(variant, mix_weight=0.0), digits)
    base_model, base_history = _train(_config(base), digits)

    assert base_model.mix_weight == 0.0
    np.testing.assert_allclose(variant_history.history["loss"], base_history.history["loss"], rtol=1e-6)
    for variant_weight, base_weight in zip(variant_model.weights, base_model.weights):
        np.testing.assert_allclose(variant_weight.numpy(), base_weight.numpy(), rtol=1e-6, atol=1e-7)


def test_simclr_training_state_round_trip(digits, tmp_path):
    """A SimCLR run has no queue: its backup records queue_pointer None and restores."""
    config = _config("simclr_mixco")
    model, _ = _train(config, digits, steps=1)
    state = checkpointing.save_training_state(model, str(tmp_path), epoch=1)

    restored = experiment.build_model(config)
    restored.compile(optimizer=experiment.build_optimizer(config, steps_per_epoch=1))
    restored.optimizer.build(restored.trainable_variables)
    checkpointing.restore_training_state(restored, str(tmp_path), checkpointing.read_training_state(str(tmp_path)))

    assert state["queue_pointer"] is None
    assert int(restored.optimizer.iterations.numpy()) == 1
    np.testing.assert_array_equal(restored.seed_generator.state.numpy(), model.seed_generator.state.numpy())
    for original, loaded in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy(), err_msg=original.path)


def test_simclr_run_ignores_queue_settings(digits, caplog):
    """A queue larger than the data only warns for the methods that have a queue."""
    simclr = dataclasses.replace(_config("simclr"), queue_size=4096)
    with caplog.at_level("WARNING", logger="mixco_tf.experiment"):
        experiment._check_data_fits_config(simclr, digits)
    assert "queue_size" not in caplog.text
