"""The oneDNN switch of mixco_tf.runtime, in fresh interpreters (TensorFlow reads it once)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_REPORT = "import json, os; from mixco_tf import runtime; print(json.dumps([os.environ.get('TF_ENABLE_ONEDNN_OPTS'), runtime.onednn_enabled()]))"


def _python(code, onednn=None):
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def test_importing_mixco_tf_first_turns_onednn_on():
    completed = _python("import mixco_tf; " + _REPORT)

    assert json.loads(completed.stdout.splitlines()[-1]) == ["1", True]
    assert "oneDNN CPU kernels are off" not in completed.stderr


def test_user_choice_is_kept():
    completed = _python("import mixco_tf; " + _REPORT, onednn="0")

    assert json.loads(completed.stdout.splitlines()[-1]) == ["0", False]
    assert "oneDNN CPU kernels are off" not in completed.stderr


def test_tensorflow_imported_first_warns_with_the_fix():
    completed = _python("import tensorflow; import mixco_tf; " + _REPORT)

    # Unset, and TensorFlow kept its default for this CPU; the warning says how to fix it.
    environment_value, enabled = json.loads(completed.stdout.splitlines()[-1])
    assert environment_value is None
    if enabled:
        pytest.skip("this CPU gets oneDNN by default, so there is nothing to warn about")
    assert "oneDNN CPU kernels are off" in completed.stderr
    assert "Import mixco_tf before TensorFlow" in completed.stderr


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

    assert fast["onednn"] is True and default["onednn"] is False
    np.testing.assert_allclose(fast["loss"], default["loss"], rtol=1e-4)
    fast_update, default_update = np.asarray(fast["update"]), np.asarray(default["update"])
    assert np.linalg.norm(default_update) > 0
    assert np.linalg.norm(fast_update - default_update) < 1e-4 * np.linalg.norm(default_update)
