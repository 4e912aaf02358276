"""Backbone layout: torchvision parameter counts, stems, widths and projection head."""

import numpy as np
import pytest

from mixco_tf.models.resnet import build_backbone, build_projection_head

# torchvision.models.resnetXX(): total parameters minus the 1000-way fc layer.
TORCHVISION_PARAMETERS = {
    "resnet18": 11_689_512 - (512 * 1000 + 1000),
    "resnet34": 21_797_672 - (512 * 1000 + 1000),
    "resnet50": 25_557_032 - (2048 * 1000 + 1000),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMETERS))
def test_trainable_parameters_match_torchvision(name):
    backbone = build_backbone(name, stem="imagenet")
    trainable = sum(int(np.prod(weight.shape)) for weight in backbone.trainable_weights)
    assert trainable == TORCHVISION_PARAMETERS[name]


@pytest.mark.parametrize(
    "stem, image_size, final_side",
    [("imagenet", 224, 7), ("imagenet", 64, 2), ("cifar", 32, 4), ("cifar", 64, 8)],
)
def test_stem_downsampling(stem, image_size, final_side):
    backbone = build_backbone("resnet18", stem=stem, width_multiplier=0.125)
    last_block = backbone.get_layer("layer4_block1_out")
    images = np.zeros((1, image_size, image_size, 3), "float32")
    import keras

    probe = keras.Model(backbone.input, last_block.output)
    assert probe(images).shape == (1, final_side, final_side, 64)


@pytest.mark.parametrize("name, width, feature_dim", [("resnet18", 0.25, 128), ("resnet50", 0.125, 256)])
def test_feature_dim_follows_width(name, width, feature_dim):
    backbone = build_backbone(name, stem="cifar", width_multiplier=width)
    features = backbone(np.random.default_rng(0).normal(size=(2, 20, 28, 3)).astype("float32"))
    assert features.shape == (2, feature_dim)


def test_stride_two_pads_symmetrically():
    """torchvision pads 3 pixels on every side of the 7x7 stride-2 stem."""
    backbone = build_backbone("resnet18", stem="imagenet", width_multiplier=0.125)
    assert backbone.get_layer("stem_conv_pad").padding == ((3, 3), (3, 3))
    assert backbone.get_layer("stem_conv").padding == "valid"


@pytest.mark.parametrize("kwargs", [{"name": "resnet101"}, {"stem": "tiny"}, {"width_multiplier": 0}])
def test_invalid_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        build_backbone(**kwargs)


def test_projection_head_shapes():
    head = build_projection_head(512, 128)
    assert [layer.units for layer in head.layers if hasattr(layer, "units")] == [512, 128]
    assert head(np.zeros((3, 512), "float32")).shape == (3, 128)


def test_kernels_of_equal_shape_differ():
    """Regression: one shared initializer instance gave equal kernels the same values."""
    backbone = build_backbone("resnet18", stem="cifar", width_multiplier=0.125)
    first = backbone.get_layer("layer1_block0_conv2").kernel.numpy()
    second = backbone.get_layer("layer1_block1_conv1").kernel.numpy()
    assert first.shape == second.shape
    assert not np.array_equal(first, second)


def test_global_seed_fixes_initial_weights():
    import keras

    keras.utils.set_random_seed(7)
    first = build_backbone("resnet18", stem="cifar", width_multiplier=0.125).get_weights()
    keras.utils.set_random_seed(7)
    second = build_backbone("resnet18", stem="cifar", width_multiplier=0.125).get_weights()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
