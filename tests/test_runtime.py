"""mixco_tf.runtime: oneDNN detection, its unsafe-shape guard, and steps under oneDNN.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it loads, so the oneDNN cases run in
fresh interpreters.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mixco_tf import losses, runtime
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


@pytest.mark.parametrize("width, expected_channels", [(0.0625, [4, 8, 16]), (0.125, [8, 16, 32]), (0.25, [16, 32, 64])])
def test_downsample_convolutions_and_channels(width, expected_channels):
    backbone = build_backbone("resnet18", "cifar", width)

    unsafe = runtime.unsafe_onednn_convolutions(backbone)

    # ResNet-18's strided 1x1 convolutions are the downsample shortcuts of stages 2-4;
    # their input channels are the previous stage's width, 64 * width for stage 1.
    assert len(BLOCKS["resnet18"][1]) == 4
    expected = [
        (f"layer{stage}_block0_downsample_conv", channels)
        for stage, channels in zip((2, 3, 4), expected_channels)
        if channels < runtime.MIN_SAFE_CHANNELS
    ]
    assert unsafe == expected


def test_guard_is_silent_without_onednn():
    completed = _python(
        "from mixco_tf import runtime; from mixco_tf.models import MixCo; "
        "m = MixCo(width_multiplier=0.0625, queue_size=32); print(runtime.onednn_enabled())",
        onednn="0",
    )

    assert completed.stdout.split()[-1] == "False"


def test_guard_rejects_unsafe_width_under_onednn():
    completed = _python(
        "from mixco_tf.models import MixCo; MixCo(width_multiplier=0.0625, queue_size=32)",
        onednn="1",
        check=False,
    )

    assert completed.returncode != 0
    assert "layer2_block0_downsample_conv" in completed.stderr
    assert "4 input channels" in completed.stderr
    assert "TF_ENABLE_ONEDNN_OPTS=0" in completed.stderr


_SAFE_SHAPES = """
import json
import numpy as np, tensorflow as tf
from mixco_tf import runtime
rng = np.random.default_rng(0)
errors = []
for channels in (8, 12, 16, 64):
    for size in (8, 16, 32):
        x = tf.constant(rng.normal(size=(8, size, size, channels)).astype("float32"))
        w = tf.constant(rng.normal(size=(1, 1, channels, 2 * channels)).astype("float32"))

        @tf.function
        def filter_gradient(x, w):
            with tf.GradientTape() as tape:
                tape.watch(w)
                y = tf.nn.conv2d(x, w, 2, "SAME")
            return tape.gradient(y, w, output_gradients=tf.cos(y)), tf.cos(y)

        gradient, upstream = filter_gradient(x, w)
        # 1x1 stride 2: every output pixel reads input pixel (2i, 2j).
        reference = np.einsum("nijc,nijo->co", x.numpy()[:, ::2, ::2, :].astype(np.float64), upstream.numpy())
        errors.append(float(np.abs(gradient.numpy()[0, 0] - reference).max() / np.abs(reference).max()))
print(json.dumps({"onednn": runtime.onednn_enabled(), "errors": errors}))
"""


def test_onednn_filter_gradient_at_safe_channels():
    """The shapes the guard allows: oneDNN's strided 1x1 filter gradient matches NumPy.

    Relative error 1e-5: float32 sums of up to 8 * 16 * 16 products keep about 1e-6,
    while the shapes it rejects were 8% to 350% off.
    """
    result = json.loads(_python(_SAFE_SHAPES, onednn="1").stdout.splitlines()[-1])

    assert result["onednn"] is True
    assert max(result["errors"]) < 1e-5


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
    backbone="resnet18", stem="imagenet", width_multiplier=0.25, queue_size=64, key_bn_splits=1, seed=0
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

    Only float round-off differs (other summation orders in convolutions and their
    gradients): measured 3e-6 relative on the update and 3e-7 on the loss, so 1e-4
    leaves room and still fails on a wrong kernel. The key encoder normalizes the whole
    batch here (key_bn_splits=1): split BatchNorm over groups of 2 images at 1x1 spatial
    size turns round-off into 4e-4 of the update, a conditioning effect, not a kernel
    difference. Longer runs drift apart as any two float32 runs with other summation
    orders do; docs/benchmarks.md compares their loss curves over 100 steps.
    """
    fast = json.loads(_python(_ONE_STEP, onednn="1").stdout.splitlines()[-1])
    default = json.loads(_python(_ONE_STEP, onednn="0").stdout.splitlines()[-1])

    assert fast["onednn"] is True
    assert default["onednn"] is False
    np.testing.assert_allclose(fast["loss"], default["loss"], rtol=1e-4)
    fast_update, default_update = np.asarray(fast["update"]), np.asarray(default["update"])
    assert np.linalg.norm(default_update) > 0
    assert np.linalg.norm(fast_update - default_update) < 1e-4 * np.linalg.norm(default_update)
