"""The typed training configuration: defaults, YAML files and validation.

One `Config` carries every setting of a run. Its defaults are the fast digits setting
(`configs/digits.yaml` repeats them). A YAML file overrides the defaults and command-line
flags override the YAML; `mixco_tf.train` does that merge and the models only receive
plain arguments.
"""

import dataclasses
import datetime
import os
import typing

import yaml

from mixco_tf.dataclass_repr import multiline_repr

METHODS = ("mixco", "moco", "simclr", "simclr_mixco")
# Methods named in the configuration contract that this version cannot train yet.
PLANNED_METHODS = ()
# Methods with a momentum key encoder and a queue, which use the MoCo keys below.
MOCO_METHODS = ("mixco", "moco")
# Each MixCo variant and the method it extends: the pairs that `mixco_tf.compare` reports.
BASE_METHODS = {"mixco": "moco", "simclr_mixco": "simclr"}
# Values that a method uses for keys its config file and flags leave unset. The base
# methods train without the mix loss. SimCLR + MixCo's published temperatures are
# T = T_mix = 0.5 (the authors' SimCLR scripts, github.com/sungnyun/MixCo-Mixup-Contrastive).
METHOD_DEFAULTS = {
    "moco": {"mix_weight": 0.0},
    "simclr": {"mix_weight": 0.0, "temperature": 0.5, "mix_temperature": 0.5},
    "simclr_mixco": {"temperature": 0.5, "mix_temperature": 0.5},
}
BACKBONES = ("resnet18", "resnet34", "resnet50")
STEMS = ("imagenet", "cifar")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
BATCH_NORMS = ("shuffle", "synchronized", "none")
# Keys that may differ when a run resumes in an existing model_dir: where files are,
# how long to train and how steps execute. Every other key shapes the model or the
# optimization, so changing it mid-run would make the run's config.yaml false.
RESUMABLE_KEYS = (
    "data_dir",
    "model_dir",
    "epochs",
    "strategy",
    "cpu_devices",
    "jit_compile",
    "steps_per_execution",
    "eval_batch_size",
    "knn_every",
)


class ConfigError(ValueError):
    """An invalid setting found after parsing: against the data, the registry or a model_dir."""


@dataclasses.dataclass
class Config:
    """Settings of one pretraining run; field names are the YAML keys and CLI flags."""

    # One key per line: the default dataclass repr puts every key on one long line.
    __repr__ = multiline_repr

    # Data and output.
    dataset: str = "digits"
    data_dir: typing.Optional[str] = None
    model_dir: typing.Optional[str] = None
    skip_bad_files: bool = False

    # Method and model.
    method: str = "mixco"
    backbone: str = "resnet18"
    stem: str = "cifar"
    width_multiplier: float = 0.125
    projection_dim: int = 128
    image_size: int = 16

    # Optimization: SGD with momentum, linear warm-up then cosine decay, per step.
    batch_size: int = 128
    epochs: int = 50
    learning_rate: float = 0.12
    warmup_epochs: int = 2
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9

    # MoCo and MixCo.
    moco_momentum: float = 0.99
    queue_size: int = 256
    temperature: float = 0.1
    mix_temperature: float = 0.05
    mix_weight: float = 1.0
    key_bn_splits: int = 8
    batch_norm: str = "shuffle"

    # Augmentation: MoCo-v2's, less strong for digits, which are tiny, grayscale and
    # not mirror-symmetric (no flip, no blur, crops of at least 40% of the area).
    crop_min_scale: float = 0.4
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_max_sigma: float = 2.0
    flip_prob: float = 0.0
    # Draw the views in the compiled train step (mixco_tf.augment_batched) instead of
    # in tf.data. Not resumable: its crop sampler and random draws differ.
    augment_on_device: bool = False

    # Execution.
    strategy: str = "auto"
    cpu_devices: int = 0
    precision: str = "float32"
    jit_compile: bool = False
    steps_per_execution: int = 1
    seed: int = 0

    # Evaluation at the end of the run.
    eval_batch_size: int = 256
    # kNN top-1 in the epoch logs every knn_every epochs during pretraining; 0 turns it off.
    knn_every: int = 0

    def validate(self):
        """Raises ValueError naming the first invalid key, its value and the valid range."""
        _choice(self, "method", METHODS, planned=PLANNED_METHODS)
        _choice(self, "backbone", BACKBONES)
        _choice(self, "stem", STEMS)
        _choice(self, "strategy", STRATEGIES)
        _choice(self, "precision", PRECISIONS)
        _choice(self, "batch_norm", BATCH_NORMS)
        _positive(self, "width_multiplier")
        _positive(self, "projection_dim")
        _positive(self, "epochs")
        _positive(self, "learning_rate")
        _positive(self, "temperature")
        _positive(self, "mix_temperature")
        _positive(self, "key_bn_splits")
        _positive(self, "steps_per_execution")
        _positive(self, "eval_batch_size")
        _at_least(self, "warmup_epochs", 0)
        _at_least(self, "weight_decay", 0)
        _at_least(self, "mix_weight", 0)
        _at_least(self, "cpu_devices", 0)
        _at_least(self, "knn_every", 0)
        _in_range(self, "sgd_momentum", 0.0, 1.0, upper_open=True)
        _in_range(self, "moco_momentum", 0.0, 1.0, upper_open=True)
        _in_range(self, "crop_min_scale", 0.0, 1.0, lower_open=True)
        for name in ("color_jitter_prob", "grayscale_prob", "blur_prob", "flip_prob"):
            _in_range(self, name, 0.0, 1.0)
        for name in ("brightness", "contrast", "saturation", "blur_max_sigma"):
            _at_least(self, name, 0)
        _in_range(self, "hue", 0.0, 0.5)
        if not isinstance(self.augment_on_device, bool):
            _fail("augment_on_device", self.augment_on_device, "true or false")

        if self.image_size < 8:
            _fail("image_size", self.image_size, "at least 8 pixels")
        if self.stem == "imagenet" and self.image_size < 32:
            _fail(
                "image_size",
                self.image_size,
                "at least 32 with stem=imagenet, which downsamples 32x before pooling; "
                "use stem=cifar for small images",
            )
        if self.batch_size < 2 or self.batch_size % 2:
            _fail("batch_size", self.batch_size, "an even integer of at least 2, because MixCo mixes the two halves of a batch")
        if self.method in MOCO_METHODS and self.batch_size % self.key_bn_splits:
            _fail(
                "key_bn_splits",
                self.key_bn_splits,
                f"a divisor of batch_size={self.batch_size} (split BatchNorm needs equal groups)",
            )
        # NumPy seeds must fit in 32 bits, and the random-init baseline uses seed + 1.
        if not 0 <= self.seed < 2**32 - 1:
            _fail("seed", self.seed, f"an integer in [0, {2**32 - 2}]")
        if self.model_dir and os.path.exists(self.model_dir) and not os.path.isdir(self.model_dir):
            _fail("model_dir", self.model_dir, "a folder (this path is a file); pick a new folder name")
        if self.dataset == "folder" and not self.data_dir:
            _fail("data_dir", self.data_dir, "the image folder to train on with dataset=folder; pass --data_dir=ROOT")
        if self.method in ("moco", "simclr") and self.mix_weight != 0:
            mixco_method = {"moco": "mixco", "simclr": "simclr_mixco"}[self.method]
            _fail(
                "mix_weight",
                self.mix_weight,
                f"0 with method={self.method} (it has no mix loss); use method={mixco_method} to weight the mix loss",
            )
        if self.method in MOCO_METHODS and self.queue_size < self.batch_size:
            _fail("queue_size", self.queue_size, f"at least batch_size={self.batch_size}")
        return self

    def resolved_model_dir(self):
        """Returns `model_dir`, or `runs/<dataset>-<timestamp>` when it is unset."""
        if self.model_dir:
            return self.model_dir
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return os.path.join("runs", f"{self.dataset}-{stamp}")

    def to_dict(self):
        return dataclasses.asdict(self)


def field_types():
    """Maps each config key to its Python type (`str`, `int`, `float` or `bool`)."""
    hints = typing.get_type_hints(Config)
    types = {}
    for field in dataclasses.fields(Config):
        hint = hints[field.name]
        if typing.get_origin(hint) is typing.Union:
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        types[field.name] = hint
    return types


def from_dict(values, source="config"):
    """Builds a Config from a mapping, rejecting unknown keys and values of the wrong type.

    Args:
        values: key -> value, e.g. a parsed YAML file.
        source: where the values came from, for error messages.
    """
    types = field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in {source}. Valid keys: {sorted(types)}. Check the spelling."
        )
    converted = {name: _convert(name, value, types[name], source) for name, value in values.items()}
    # A method's own defaults replace the MixCo ones for keys the source leaves unset,
    # e.g. mix_weight 0 for the base methods.
    for name, value in METHOD_DEFAULTS.get(converted.get("method"), {}).items():
        converted.setdefault(name, value)
    return Config(**converted)


def load_yaml(path):
    """Reads a YAML config file into a dict, with a clear error when it is missing or malformed."""
    if not os.path.isfile(path):
        raise ValueError(f"Config file not found: {path!r}. Pass --config=PATH to an existing YAML file.")
    with open(path, encoding="utf-8") as stream:
        try:
            values = yaml.safe_load(stream) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"Config file {path!r} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path!r} must contain a mapping of keys to values, got {type(values).__name__}.")
    return values


def changed_keys(saved_values, config):
    """Lists the keys whose value in `config` differs from a saved config.yaml mapping.

    Args:
        saved_values: the mapping of a previous run's config.yaml. Keys this version no
            longer defines are ignored, and missing keys count as their default.
        config: the new `Config`.

    Returns:
        `[(key, saved_value, new_value), ...]` for the keys outside `RESUMABLE_KEYS`
        that differ, sorted by key.
    """
    defaults = Config().to_dict()
    new_values = config.to_dict()
    changes = []
    for key in sorted(new_values):
        if key in RESUMABLE_KEYS:
            continue
        saved = saved_values.get(key, defaults[key])
        if saved != new_values[key]:
            changes.append((key, saved, new_values[key]))
    return changes


def _convert(name, value, expected_type, source):
    if value is None:
        default = Config.__dataclass_fields__[name].default
        if default is None:
            return None
        raise ValueError(f"{source}: key {name!r} is empty; give it a {expected_type.__name__} value.")
    if expected_type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif expected_type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif expected_type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif expected_type is str:
        if isinstance(value, str):
            return value
    raise ValueError(f"{source}: key {name!r} must be a {expected_type.__name__}, got {value!r}.")


def _fail(name, value, expected):
    raise ValueError(f"Invalid config value {name}={value!r}: expected {expected}.")


def _choice(config, name, choices, planned=()):
    value = getattr(config, name)
    if value in planned:
        raise ValueError(
            f"{name}={value!r} is not implemented in this version of mixco_tf. Use one of {list(choices)}."
        )
    if value not in choices:
        _fail(name, value, f"one of {list(choices)}")


def _positive(config, name):
    value = getattr(config, name)
    if not value > 0:
        _fail(name, value, "a positive number")


def _at_least(config, name, minimum):
    value = getattr(config, name)
    if not value >= minimum:
        _fail(name, value, f"at least {minimum}")


def _in_range(config, name, low, high, lower_open=False, upper_open=False):
    value = getattr(config, name)
    above = value > low if lower_open else value >= low
    below = value < high if upper_open else value <= high
    if not (above and below):
        _fail(name, value, f"in {'(' if lower_open else '['}{low}, {high}{')' if upper_open else ']'}")


HELP = {
    "dataset": "Data set name from the registry: digits (no download), tiny_imagenet, cifar10, cifar100 or folder.",
    "data_dir": "Folder holding downloaded or prepared data sets (TFDS data_dir), or the image folder of dataset=folder.",
    "skip_bad_files": "Leave out image files that cannot be decoded (counted in results.json) instead of stopping with their paths.",
    "model_dir": "Run directory for checkpoints, logs, export and results.json; default runs/<dataset>-<timestamp>.",
    "method": "mixco (MoCo-v2 + MixCo), moco (plain MoCo-v2), simclr_mixco (SimCLR + MixCo) or simclr (plain "
    "SimCLR). simclr and simclr_mixco default to temperature=0.5 and mix_temperature=0.5; moco and simclr "
    "to mix_weight=0.",
    "backbone": "resnet18, resnet34 or resnet50 (torchvision layout).",
    "stem": "imagenet (7x7/2 conv + max-pool, for 224 px) or cifar (3x3/1 conv, for 32-64 px).",
    "width_multiplier": "Multiplier of every layer's channel count; below 1 for fast CPU runs.",
    "projection_dim": "Output size of the MLP projection head.",
    "image_size": "Side of the square training views, in pixels.",
    "batch_size": "Global batch size, split evenly over the replicas; each replica's share must be even, because MixCo mixes its two halves.",
    "epochs": "Pretraining epochs.",
    "learning_rate": "Peak SGD learning rate, reached after the warm-up and decayed with a cosine.",
    "warmup_epochs": "Epochs of linear learning-rate warm-up from 0.",
    "weight_decay": "L2 weight decay added to the gradients, as torch.optim.SGD does.",
    "sgd_momentum": "SGD momentum.",
    "moco_momentum": "Momentum m of the key encoder's moving average.",
    "queue_size": "K, the number of negative keys in the queue (at least batch_size).",
    "temperature": "Temperature T of the InfoNCE loss.",
    "mix_temperature": "Temperature T_mix of the MixCo loss.",
    "mix_weight": "beta, the weight of the MixCo loss; 0 trains plain MoCo-v2.",
    "key_bn_splits": "Groups of the key encoder's split BatchNorm on each replica (Shuffle-BN on one device); 1 disables it.",
    "batch_norm": "Encoder normalization: shuffle (Shuffle-BN in the key encoder, across replicas), synchronized (key encoder BatchNorm over the global batch) or none.",
    "crop_min_scale": "Smallest area fraction of the random resized crop.",
    "brightness": "Color-jitter brightness strength (factor drawn from [1 - b, 1 + b]).",
    "contrast": "Color-jitter contrast strength.",
    "saturation": "Color-jitter saturation strength.",
    "hue": "Color-jitter hue strength, in [0, 0.5].",
    "color_jitter_prob": "Probability of applying color jitter to a view.",
    "grayscale_prob": "Probability of converting a view to grayscale.",
    "blur_prob": "Probability of blurring a view.",
    "blur_max_sigma": "Largest Gaussian-blur sigma, in pixels (the smallest is 0.1).",
    "flip_prob": "Probability of a horizontal flip (0 for data that is not mirror-symmetric).",
    "augment_on_device": "Draw the two views inside the compiled train step, batched with per-sample "
    "parameters, so a GPU or TPU augments; the input pipeline then yields plain images resized to the "
    "data set's native square side.",
    "strategy": "Distribution strategy: auto (mirrored with several GPUs or cpu_devices, else one_device), one_device, mirrored, multi_worker (cluster from TF_CONFIG) or tpu.",
    "cpu_devices": "Logical CPU devices to split the host into, e.g. 2 to train mirrored replicas without GPUs (0 keeps one).",
    "precision": "Keras dtype policy: float32, mixed_float16 (with loss scaling) or mixed_bfloat16; losses stay float32.",
    "jit_compile": "Compile the train step with XLA (one replica only).",
    "steps_per_execution": "Train steps per compiled call; more means fewer host round trips.",
    "seed": "Seed of weights, data order, augmentation and in-graph randomness.",
    "eval_batch_size": "Batch size of feature extraction for evaluation.",
    "knn_every": "Log the weighted kNN top-1 (k=200, T=0.1, train split as memory, test split as queries) "
    "as knn_top1 every N epochs and at the last epoch; 0 turns it off.",
}
