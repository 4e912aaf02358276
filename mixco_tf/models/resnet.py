"""ResNet-18/34/50 backbones in the torchvision layout, as Keras functional models.

The layout follows `torchvision.models.resnet` (v1.5: the stride of a bottleneck sits on
its 3x3 convolution), with symmetric padding written out so every stride-2 layer reads
the same pixels as in PyTorch (Keras's `padding="same"` pads more on the bottom/right).
The classifier is dropped: the output is the globally average-pooled feature vector.

Stems:
    "imagenet": 7x7 convolution with stride 2, then 3x3 max-pool with stride 2
        (the published MixCo setting, 224 px input).
    "cifar": 3x3 convolution with stride 1 and no pooling, for 32-64 px inputs.
"""

import functools

import keras

BLOCKS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
STEMS = ("imagenet", "cifar")
_STAGE_WIDTHS = (64, 128, 256, 512)


def _conv_initializer():
    """Returns torchvision's kaiming_normal_(mode="fan_out", relu) initializer.

    A new instance per layer: a Keras initializer draws its seed once, when created, so
    sharing one instance would give every kernel of the same shape the same values.
    """
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="untruncated_normal")


def _conv(filters, kernel_size, strides, name):
    """Builds a bias-free convolution with torchvision's padding of `kernel_size // 2`."""
    layers = []
    padding = kernel_size // 2
    if kernel_size == 1 and strides > 1:
        # A strided 1x1 convolution reads pixel (s * i, s * j): subsampling, then a 1x1
        # convolution, computes the same. TensorFlow 2.21's oneDNN kernels (opt-in on
        # AVX2 CPUs) get the strided form's filter gradient wrong below 8 input channels.
        layers.append(keras.layers.AveragePooling2D(pool_size=1, strides=strides, name=f"{name}_subsample"))
        strides = 1
    if strides > 1 and padding:
        layers.append(keras.layers.ZeroPadding2D(padding, name=f"{name}_pad"))
        conv_padding = "valid"
    else:
        conv_padding = "same"
    layers.append(
        keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=conv_padding,
            use_bias=False,
            kernel_initializer=_conv_initializer(),
            name=name,
        )
    )

    def apply(x):
        for layer in layers:
            x = layer(x)
        return x

    return apply


def _basic_block(x, filters, strides, batch_norm, name):
    shortcut = x
    out = _conv(filters, 3, strides, f"{name}_conv1")(x)
    out = batch_norm(name=f"{name}_bn1")(out)
    out = keras.layers.ReLU(name=f"{name}_relu1")(out)
    out = _conv(filters, 3, 1, f"{name}_conv2")(out)
    out = batch_norm(name=f"{name}_bn2")(out)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides, f"{name}_downsample_conv")(x)
        shortcut = batch_norm(name=f"{name}_downsample_bn")(shortcut)
    out = keras.layers.Add(name=f"{name}_add")([out, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(out)


def _bottleneck_block(x, filters, strides, batch_norm, name, expansion=4):
    shortcut = x
    out = _conv(filters, 1, 1, f"{name}_conv1")(x)
    out = batch_norm(name=f"{name}_bn1")(out)
    out = keras.layers.ReLU(name=f"{name}_relu1")(out)
    out = _conv(filters, 3, strides, f"{name}_conv2")(out)
    out = batch_norm(name=f"{name}_bn2")(out)
    out = keras.layers.ReLU(name=f"{name}_relu2")(out)
    out = _conv(filters * expansion, 1, 1, f"{name}_conv3")(out)
    out = batch_norm(name=f"{name}_bn3")(out)
    if strides != 1 or x.shape[-1] != filters * expansion:
        shortcut = _conv(filters * expansion, 1, strides, f"{name}_downsample_conv")(x)
        shortcut = batch_norm(name=f"{name}_downsample_bn")(shortcut)
    out = keras.layers.Add(name=f"{name}_add")([out, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(out)


def build_backbone(
    name="resnet18",
    stem="imagenet",
    width_multiplier=1.0,
    batch_norm=None,
    model_name=None,
):
    """Builds a torchvision-layout ResNet that returns pooled features.

    Args:
        name: "resnet18", "resnet34" or "resnet50".
        stem: "imagenet" (7x7/2 convolution + max-pool) or "cifar" (3x3/1, no pool).
        width_multiplier: scales every layer's channel count (64, 128, 256, 512 at 1.0),
            rounded to at least 1 channel; below 1.0 for fast CPU runs.
        batch_norm: factory `batch_norm(name=...) -> layer`; defaults to
            `keras.layers.BatchNormalization` with PyTorch's momentum and epsilon.
        model_name: name of the returned model; defaults to `name`.

    Returns:
        A `keras.Model` mapping normalized float images `[batch, height, width, 3]` of
        any height and width to features `[batch, feature_dim]`, where feature_dim is
        `512 * width_multiplier` (times 4 for ResNet-50).
    """
    if name not in BLOCKS:
        raise ValueError(f"Unknown backbone {name!r}. Choose one of {sorted(BLOCKS)}.")
    if stem not in STEMS:
        raise ValueError(f"Unknown stem {stem!r}. Choose one of {list(STEMS)}.")
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier}.")
    if batch_norm is None:
        # PyTorch's BatchNorm momentum 0.1 is Keras's 0.9 (the weight of the old value).
        batch_norm = functools.partial(keras.layers.BatchNormalization, momentum=0.9, epsilon=1e-5)

    block_type, stage_depths = BLOCKS[name]
    block = _basic_block if block_type == "basic" else _bottleneck_block
    widths = [max(1, int(round(width * width_multiplier))) for width in _STAGE_WIDTHS]

    inputs = keras.Input(shape=(None, None, 3), name="images")
    if stem == "imagenet":
        x = _conv(widths[0], 7, 2, "stem_conv")(inputs)
    else:
        x = _conv(widths[0], 3, 1, "stem_conv")(inputs)
    x = batch_norm(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    if stem == "imagenet":
        # Zero padding equals PyTorch's -inf padding here because inputs are post-ReLU.
        x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)

    for stage, (filters, depth) in enumerate(zip(widths, stage_depths)):
        for index in range(depth):
            strides = 2 if stage > 0 and index == 0 else 1
            x = block(x, filters, strides, batch_norm, name=f"layer{stage + 1}_block{index}")

    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, features, name=model_name or name)


def build_projection_head(feature_dim, projection_dim=128, hidden_dim=None, name="projection_head"):
    """Builds MoCo-v2's MLP head: Dense(hidden) -> ReLU -> Dense(projection_dim).

    Args:
        feature_dim: size of the backbone features it consumes.
        projection_dim: output size (128 in MoCo-v2 and MixCo).
        hidden_dim: hidden size; defaults to `feature_dim` (512 -> 512 -> 128 for
            ResNet-18), as in MoCo-v2.
        name: model name.

    Returns:
        A `keras.Model` mapping `[batch, feature_dim]` to `[batch, projection_dim]`.
    """
    hidden_dim = hidden_dim or feature_dim
    inputs = keras.Input(shape=(feature_dim,), name="features")
    x = keras.layers.Dense(hidden_dim, name="hidden")(inputs)
    x = keras.layers.ReLU(name="hidden_relu")(x)
    outputs = keras.layers.Dense(projection_dim, name="projection")(x)
    return keras.Model(inputs, outputs, name=name)
