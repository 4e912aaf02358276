"""Readable reprs of the config dataclasses."""

import dataclasses

from mixco_tf.augment import AugmentConfig
from mixco_tf.config import Config
from mixco_tf.dataclass_repr import MAX_LINE_LENGTH, multiline_repr


@dataclasses.dataclass
class _Small:
    rate: float = 0.5
    name: str = "a"
    hidden: int = dataclasses.field(default=3, repr=False)

    __repr__ = multiline_repr


def test_short_repr_stays_on_one_line():
    assert repr(_Small()) == "_Small(rate=0.5, name='a')"


def test_config_repr_has_one_key_per_line():
    lines = repr(Config()).splitlines()

    assert lines[0] == "Config("
    assert lines[1] == "    dataset='digits',"
    assert lines[-1] == ")"
    assert len(lines) == len(dataclasses.fields(Config)) + 2
    assert max(len(line) for line in lines) <= MAX_LINE_LENGTH


def test_config_repr_evaluates_to_equal_config():
    config = Config(dataset="digits", epochs=3, model_dir="runs/x")

    assert eval(repr(config)) == config  # noqa: S307 - the repr of a trusted local object


def test_augment_config_repr_evaluates_to_equal_config():
    config = AugmentConfig(crop_scale=(0.4, 1.0), blur_prob=0.0)
    text = repr(config)

    assert "    crop_scale=(0.4, 1.0),\n" in text
    assert eval(text) == config  # noqa: S307 - the repr of a trusted local object
