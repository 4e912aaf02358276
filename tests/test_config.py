"""Config defaults, YAML parsing and validation messages."""

import dataclasses
import pathlib

import pytest
import yaml

from mixco_tf import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_digits_yaml_equals_defaults():
    """`python -m mixco_tf.train` without flags must train exactly the digits.yaml setting."""
    values = config_lib.load_yaml(str(REPO / "configs" / "digits.yaml"))
    assert config_lib.from_dict(values) == config_lib.Config()


def test_every_config_file_is_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config_lib.from_dict(config_lib.load_yaml(str(path)), source=str(path)).validate()


def test_defaults_are_valid():
    config_lib.Config().validate()


def test_every_key_has_help():
    assert set(config_lib.HELP) == set(config_lib.field_types())


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['batchsize'\]"):
        config_lib.from_dict({"batchsize": 64})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": "ten"}, "'epochs' must be a int"),
        ({"learning_rate": "fast"}, "'learning_rate' must be a float"),
        ({"jit_compile": "maybe"}, "'jit_compile' must be a bool"),
        ({"batch_size": True}, "'batch_size' must be a int"),
    ],
)
def test_wrong_types_are_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        config_lib.from_dict(values)


def test_types_are_converted():
    config = config_lib.from_dict({"learning_rate": 1, "epochs": 3.0, "jit_compile": "true", "weight_decay": "1e-4"})
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.epochs == 3 and isinstance(config.epochs, int)
    assert config.jit_compile is True
    assert config.weight_decay == 1e-4


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"batch_size": 7}, "batch_size"),
        ({"batch_size": 64, "queue_size": 32}, "queue_size"),
        ({"batch_size": 36, "key_bn_splits": 8}, "key_bn_splits"),
        ({"temperature": 0.0}, "temperature"),
        ({"moco_momentum": 1.0}, "moco_momentum"),
        ({"mix_weight": -0.5}, "mix_weight"),
        ({"method": "byol"}, "method"),
        ({"method": "simclr"}, "method"),
        ({"backbone": "vit"}, "backbone"),
        ({"stem": "imagenet", "image_size": 16}, "image_size"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"crop_min_scale": 0.0}, "crop_min_scale"),
        ({"hue": 0.7}, "hue"),
        ({"epochs": 0}, "epochs"),
        ({"strategy": "gpus"}, "strategy"),
        ({"precision": "float64"}, "precision"),
        ({"batch_norm": "group"}, "batch_norm"),
    ],
)
def test_invalid_values_name_the_key(changes, key):
    config = dataclasses.replace(config_lib.Config(), **changes)
    with pytest.raises(ValueError, match=key):
        config.validate()


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        config_lib.load_yaml(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        config_lib.load_yaml(str(bad))
    listing = tmp_path / "list.yaml"
    listing.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ValueError, match="mapping"):
        config_lib.load_yaml(str(listing))


def test_model_dir_default_names_dataset():
    assert config_lib.Config(dataset="digits").resolved_model_dir().startswith("runs/digits-")
    assert config_lib.Config(model_dir="/tmp/x").resolved_model_dir() == "/tmp/x"


def test_changed_keys_ignores_resumable_keys():
    saved = config_lib.Config(epochs=10, eval_batch_size=64, model_dir="runs/a").to_dict()
    config = config_lib.Config(epochs=20, eval_batch_size=128, model_dir="runs/b")

    assert config_lib.changed_keys(saved, config) == []


def test_changed_keys_lists_model_keys():
    saved = config_lib.Config(backbone="resnet18", queue_size=256, learning_rate=0.06).to_dict()
    config = config_lib.Config(backbone="resnet34", queue_size=512, learning_rate=0.1)

    assert config_lib.changed_keys(saved, config) == [
        ("backbone", "resnet18", "resnet34"),
        ("learning_rate", 0.06, 0.1),
        ("queue_size", 256, 512),
    ]


def test_changed_keys_treats_missing_as_default():
    saved = config_lib.Config().to_dict()
    del saved["flip_prob"]
    saved["retired_key"] = 1

    assert config_lib.changed_keys(saved, config_lib.Config()) == []


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_out_of_range_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        dataclasses.replace(config_lib.Config(), seed=seed).validate()


def test_model_dir_that_is_a_file_is_rejected(tmp_path):
    path = tmp_path / "afile"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match="model_dir"):
        dataclasses.replace(config_lib.Config(), model_dir=str(path)).validate()


def test_moco_records_zero_mix_weight():
    config = config_lib.from_dict({"method": "moco"}).validate()
    assert config.mix_weight == 0.0


def test_moco_with_mix_weight_is_a_conflict():
    with pytest.raises(ValueError, match="mix_weight"):
        config_lib.from_dict({"method": "moco", "mix_weight": 0.5}).validate()


@pytest.mark.parametrize(
    "key, values",
    [
        ("strategy", ["auto", "one_device", "mirrored", "multi_worker", "tpu"]),
        ("precision", ["float32", "mixed_float16", "mixed_bfloat16"]),
        ("batch_norm", ["shuffle", "synchronized", "none"]),
    ],
)
def test_execution_choices_are_valid(key, values):
    for value in values:
        dataclasses.replace(config_lib.Config(), **{key: value}).validate()


@pytest.mark.parametrize("method", ["simclr", "simclr_mixco"])
def test_simclr_methods_default_to_published_temperatures(method):
    config = config_lib.from_dict({"method": method}).validate()
    assert config.temperature == 0.5
    assert config.mix_temperature == 0.5
    assert config.mix_weight == (0.0 if method == "simclr" else 1.0)


def test_method_defaults_yield_to_explicit_values():
    config = config_lib.from_dict({"method": "simclr_mixco", "temperature": 0.2, "mix_weight": 0.5}).validate()
    assert config.temperature == 0.2
    assert config.mix_temperature == 0.5
    assert config.mix_weight == 0.5


def test_simclr_with_mix_weight_is_a_conflict():
    with pytest.raises(ValueError, match=r"mix_weight=0.5.*method=simclr .*use method=simclr_mixco"):
        config_lib.from_dict({"method": "simclr", "mix_weight": 0.5}).validate()


def test_simclr_ignores_queue_and_key_bn_settings():
    """SimCLR has no queue and no key encoder, so their MoCo constraints do not apply."""
    config = config_lib.from_dict({"method": "simclr", "queue_size": 16, "key_bn_splits": 5, "batch_size": 32})
    assert config.validate() is config
    with pytest.raises(ValueError, match="key_bn_splits"):
        config_lib.from_dict({"method": "moco", "key_bn_splits": 5, "batch_size": 32}).validate()


def test_every_method_is_valid():
    for method in config_lib.METHODS:
        assert config_lib.from_dict({"method": method}).validate().method == method
    assert not set(config_lib.PLANNED_METHODS) & set(config_lib.METHODS)


def test_unknown_method_lists_all_four():
    with pytest.raises(ValueError, match=r"method='byol'.*\['mixco', 'moco', 'simclr', 'simclr_mixco'\]"):
        config_lib.from_dict({"method": "byol"}).validate()


def test_every_mixco_variant_has_its_base():
    for variant, base in config_lib.BASE_METHODS.items():
        assert variant in config_lib.METHODS
        assert base in config_lib.METHODS
        assert config_lib.from_dict({"method": base}).mix_weight == 0.0
