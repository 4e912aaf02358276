"""oneDNN CPU kernels: detection, the shapes they got wrong, and steps under oneDNN.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it loads, so the oneDNN cases run in
fresh interpreters.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import keras
import tensorflow as tf

from mixco_tf import losses
from mixco_tf.models import build_backbone
from mixco_tf.models.resnet import BLOCKS

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, onednn=None, check=True):
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_backbones_have_no_strided_pointwise_conv(name):
    backbone = build_backbone(name, "cifar", 0.0625)

    convolutions = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    pointwise = [layer for layer in convolutions if tuple(layer.kernel_size) == (1, 1)]
    assert pointwise
    for layer in pointwise:
        assert tuple(layer.strides) == (1, 1), layer.name


def test_subsampled_shortcut_equals_strided_conv():
    backbone = build_backbone("resnet18", "cifar", 0.0625)
    subsample = backbone.get_layer("layer2_block0_downsample_conv_subsample")
    conv = backbone.get_layer("layer2_block0_downsample_conv")
    x = np.random.default_rng(0).normal(size=(2, 7, 8, 4)).astype("float32")

    output = conv(subsample(x)).numpy()

    # A 1x1 convolution with stride 2 and torchvision's zero padding reads pixel (2i, 2j).
    kernel = conv.kernel.numpy()[0, 0].astype(np.float64)
    expected = np.einsum("nhwc,co->nhwo", x[:, ::2, ::2, :].astype(np.float64), kernel)
    assert output.shape == (2, 4, 4, 8)
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)


def test_nan_unless_finite_gradients():
    loss = tf.constant(1.5)
    finite = [tf.ones([2, 2]), None, tf.constant([3.0])]

    assert float(losses.nan_unless_finite_gradients(loss, finite)) == 1.5
    for bad in (np.nan, np.inf, -np.inf):
        gradients = [tf.ones([2, 2]), tf.constant([bad, 0.0])]
        assert np.isnan(float(losses.nan_unless_finite_gradients(loss, gradients)))


_NAN_BATCH = """
import numpy as np, keras, tensorflow as tf
from mixco_tf import checkpointing, runtime
from mixco_tf.models import MixCo
assert runtime.onednn_enabled()
model = MixCo(width_multiplier=0.125, projection_dim=16, queue_size=32, key_bn_splits=2, seed=3)
model.compile(optimizer=keras.optimizers.SGD(0.05))
images = np.random.default_rng(0).normal(size=(16, 16, 16, 3)).astype("float32")
images[8:] = np.nan
views = tf.data.Dataset.from_tensor_slices((images, images)).batch(8, drop_remainder=True)
try:
    model.fit(views, epochs=1, verbose=0, callbacks=[checkpointing.NonFiniteLossGuard(likely_causes="NaN input.")])
except checkpointing.NonFiniteLossError as error:
    print("stopped:", error)
"""


def test_nan_batch_stops_training_under_onednn():
    """oneDNN's fused ReLU turns the NaN features into zeros; the NaN gradients still stop the run."""
    completed = _python(_NAN_BATCH, onednn="1")

    assert "stopped:" in completed.stdout
    assert "loss=nan" in completed.stdout


_ONE_STEP = """
import json
import numpy as np, keras, tensorflow as tf
from mixco_tf import runtime
from mixco_tf.models import MixCo
keras.utils.set_random_seed(0)
model = MixCo(
    backbone="resnet18", stem="imagenet", width_multiplier=0.0625, queue_size=64, key_bn_splits=1, seed=0
)
model.compile(optimizer=keras.optimizers.SGD(0.1))
rng = np.random.default_rng(0)
views = rng.normal(size=(2, 16, 32, 32, 3)).astype("float32")
before = np.concatenate([w.numpy().ravel() for w in model.backbone.trainable_weights])
dataset = tf.data.Dataset.from_tensors((views[0], views[1])).repeat()
loss = model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0).history["loss"][0]
after = np.concatenate([w.numpy().ravel() for w in model.backbone.trainable_weights])
print(json.dumps({"onednn": runtime.onednn_enabled(), "loss": loss, "update": (after - before).tolist()}))
"""


def test_onednn_step_matches_default_kernels():
    """One MixCo step gives the same loss and update with oneDNN kernels as without.

    Width 0.0625 gives the downsample shortcut of stage 2 four input channels: as a
    strided 1x1 convolution, oneDNN's update was 9% (relative norm) off TensorFlow's
    own kernels. Now only float round-off differs: measured 1e-5 relative on the update
    and 6e-8 on the loss, so 1e-4 leaves room. The key encoder normalizes the whole
    batch (key_bn_splits=1), because BatchNorm over groups of 2 images at 1x1 spatial
    size multiplies round-off by about 100.
    """
    fast = json.loads(_python(_ONE_STEP, onednn="1").stdout.splitlines()[-1])
    default = json.loads(_python(_ONE_STEP, onednn="0").stdout.splitlines()[-1])

    assert fast["onednn"] is True
    assert default["onednn"] is False
    np.testing.assert_allclose(fast["loss"], default["loss"], rtol=1e-4)
    fast_update, default_update = np.asarray(fast["update"]), np.asarray(default["update"])
    assert np.linalg.norm(default_update) > 0
    assert np.linalg.norm(fast_update - default_update) < 1e-4 * np.linalg.norm(default_update)
