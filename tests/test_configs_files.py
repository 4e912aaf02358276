"""The YAML files in configs/: each loads and validates, and the published ones match the MixCo paper's Tiny ImageNet setting."""

import pathlib

import pytest

from mixco_tf import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
DATA_SET_CONFIGS = sorted(path.name for path in CONFIGS.glob("*.yaml") if not path.name.startswith("digits"))


def _load(name):
    return config_lib.from_dict(config_lib.load_yaml(str(CONFIGS / name)), source=name).validate()


def test_data_set_configs_exist():
    assert DATA_SET_CONFIGS == [
        "cifar100_resnet18_mixco_fast.yaml",
        "cifar10_resnet18_mixco_fast.yaml",
        "tiny_imagenet_resnet18_mixco.yaml",
        "tiny_imagenet_resnet18_mixco_fast.yaml",
        "tiny_imagenet_resnet18_moco.yaml",
        "tiny_imagenet_resnet18_simclr.yaml",
        "tiny_imagenet_resnet34_simclr.yaml",
        "tiny_imagenet_resnet50_simclr.yaml",
    ]


@pytest.mark.parametrize("name", DATA_SET_CONFIGS)
def test_config_file_loads_and_validates(name):
    config = _load(name)

    dataset, rest = name.split("_resnet")
    assert config.dataset == dataset
    assert config.backbone == "resnet" + rest.split("_")[0]


@pytest.mark.parametrize("name, method, mix_weight", [("tiny_imagenet_resnet18_mixco.yaml", "mixco", 1.0), ("tiny_imagenet_resnet18_moco.yaml", "moco", 0.0)])
def test_published_setting(name, method, mix_weight):
    config = _load(name)

    assert (config.method, config.mix_weight) == (method, mix_weight)
    assert (config.stem, config.image_size, config.width_multiplier) == ("imagenet", 224, 1.0)
    assert (config.batch_size, config.epochs, config.learning_rate, config.warmup_epochs) == (128, 100, 0.015, 0)
    assert (config.weight_decay, config.sgd_momentum) == (1e-4, 0.9)
    assert (config.queue_size, config.moco_momentum, config.temperature, config.mix_temperature) == (65536, 0.999, 0.2, 0.05)
    assert (config.projection_dim, config.crop_min_scale, config.blur_prob, config.flip_prob) == (128, 0.2, 0.5, 0.5)
    assert (config.brightness, config.contrast, config.saturation, config.hue) == (0.4, 0.4, 0.4, 0.1)
    assert (config.color_jitter_prob, config.grayscale_prob, config.blur_max_sigma) == (0.8, 0.2, 2.0)


@pytest.mark.parametrize("name", [name for name in DATA_SET_CONFIGS if name.endswith("_fast.yaml")])
def test_fast_variant_uses_cifar_stem(name):
    config = _load(name)

    assert config.stem == "cifar"
    assert config.image_size == (64 if name.startswith("tiny_imagenet") else 32)
