"""`mixco_tf.compare`: the run plan, mean ± std over seeds, paired gains, the plot and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mixco_tf import compare

METRICS = ("linear_top1", "knn_top1")


def _record(method, seed, width=0.125, linear=0.9, knn=0.8, random_init=None):
    return {
        "method": method,
        "backbone": "resnet18",
        "width_multiplier": width,
        "seed": seed,
        "evaluation": {"linear_top1": linear, "knn_top1": knn},
        "random_init_evaluation": random_init,
    }


def test_summary_matches_numpy_mean_and_sample_std():
    rng = np.random.default_rng(0)
    linear = {method: rng.uniform(0.5, 1.0, size=3) for method in ("mixco", "moco")}
    records = [
        _record(method, seed, linear=float(linear[method][seed]))
        for method in ("mixco", "moco")
        for seed in range(3)
    ]

    summary = compare.summarize(records, METRICS)

    rows = {row["method"]: row for row in summary["rows"]}
    for method in ("mixco", "moco"):
        assert rows[method]["num_seeds"] == 3
        np.testing.assert_allclose(rows[method]["linear_top1"]["mean"], linear[method].mean())
        np.testing.assert_allclose(rows[method]["linear_top1"]["std"], linear[method].std(ddof=1))
    (gain,) = summary["gains"]
    assert (gain["method"], gain["base"]) == ("mixco", "moco")
    differences = linear["mixco"] - linear["moco"]
    np.testing.assert_allclose(gain["linear_top1"]["mean"], differences.mean())
    np.testing.assert_allclose(gain["linear_top1"]["std"], differences.std(ddof=1))


def test_gains_pair_seeds_and_skip_missing_base():
    """Only seeds that both methods finished enter a gain; a variant without its base has none."""
    records = [
        _record("mixco", 0, linear=0.9),
        _record("mixco", 1, linear=0.8),
        _record("moco", 1, linear=0.7),
        _record("simclr_mixco", 0, linear=0.5),
    ]

    summary = compare.summarize(records, METRICS)

    (gain,) = summary["gains"]
    assert gain["num_seeds"] == 1
    np.testing.assert_allclose(gain["linear_top1"]["mean"], 0.1)
    assert gain["linear_top1"]["std"] == 0.0


def test_random_init_row_and_method_order():
    baseline = {"linear_top1": 0.6, "knn_top1": 0.5}
    records = [
        _record("simclr", 0),
        _record("moco", 0, random_init=baseline),
        _record("mixco", 0),
        _record("simclr_mixco", 0),
    ]

    summary = compare.summarize(records, METRICS)

    assert [row["method"] for row in summary["rows"]] == ["mixco", "moco", "simclr", "simclr_mixco", "random init"]
    assert summary["rows"][-1]["linear_top1"]["mean"] == 0.6
    assert [(gain["method"], gain["base"]) for gain in summary["gains"]] == [("mixco", "moco"), ("simclr_mixco", "simclr")]


def test_markdown_table_in_percent():
    records = [_record("mixco", seed, linear=value) for seed, value in enumerate((0.90, 0.92, 0.94))]
    records += [_record("moco", seed, linear=value) for seed, value in enumerate((0.89, 0.90, 0.91))]

    table = compare.format_markdown(compare.summarize(records, METRICS), METRICS)

    lines = table.splitlines()
    assert lines[0] == "| method | backbone | width | seeds | linear_top1 | knn_top1 |"
    assert "| mixco | resnet18 | 0.125 | 3 | 92.0 ± 2.0 | 80.0 ± 0.0 |" in lines
    assert "| moco | resnet18 | 0.125 | 3 | 90.0 ± 1.0 | 80.0 ± 0.0 |" in lines
    assert "| mixco − moco | resnet18 | 0.125 | 3 | +2.0 ± 1.0 | +0.0 ± 0.0 |" in lines


def test_capacity_plot_is_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = [
        _record(method, seed, width=width, linear=0.8 + 0.1 * (method == "mixco") * width + 0.01 * seed)
        for width in (0.0625, 0.125, 0.25)
        for method in ("mixco", "moco")
        for seed in range(2)
    ]
    path = str(tmp_path / "capacity.png")

    written = compare.plot_capacity(compare.summarize(records, METRICS), path, METRICS)

    assert written == path
    with open(path, "rb") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plan_applies_each_method_defaults(tmp_path):
    configs = compare.plan_runs(
        {"epochs": 3}, ["mixco", "moco", "simclr_mixco", "simclr"], None, [0.0625, 0.125], [0, 1], str(tmp_path)
    )

    assert len(configs) == 16
    by_name = {os.path.basename(config.model_dir): config for config in configs}
    assert set(by_name) >= {"mixco-resnet18-w0.0625-seed0", "simclr-resnet18-w0.125-seed1"}
    simclr, mixco = by_name["simclr-resnet18-w0.125-seed1"], by_name["mixco-resnet18-w0.125-seed1"]
    assert (simclr.temperature, simclr.mix_temperature, simclr.mix_weight) == (0.5, 0.5, 0.0)
    assert (mixco.temperature, mixco.mix_temperature, mixco.mix_weight) == (0.1, 0.05, 1.0)
    assert by_name["moco-resnet18-w0.0625-seed0"].mix_weight == 0.0
    # Everything but the method's own keys is shared: same budget and seed per pair.
    for config in configs:
        assert config.epochs == 3
        assert config.batch_size == simclr.batch_size
    assert [config.method for config in configs[:4]] == ["mixco", "moco", "simclr_mixco", "simclr"]


def test_plan_shared_values_override_method_defaults(tmp_path):
    (config,) = compare.plan_runs({"temperature": 0.2}, ["simclr"], None, None, [0], str(tmp_path))
    assert config.temperature == 0.2
    assert config.mix_temperature == 0.5


@pytest.mark.parametrize(
    "methods, base, message",
    [
        (["byol"], {}, r"Invalid method 'byol'"),
        (["mixco", "mixco"], {}, "lists a method twice"),
        (["moco"], {"mix_weight": 1.0}, r"Run moco-resnet18-w0.125-seed0: .*mix_weight=1.0"),
        ([], {}, "--methods is empty"),
    ],
)
def test_plan_rejects_bad_runs(tmp_path, methods, base, message):
    with pytest.raises(ValueError, match=message):
        compare.plan_runs(base, methods, None, None, [0], str(tmp_path))


def test_overrides_are_yaml_typed():
    assert compare.parse_overrides(["epochs=15", "jit_compile=true", "learning_rate=0.1"]) == {
        "epochs": 15,
        "jit_compile": True,
        "learning_rate": 0.1,
    }
    with pytest.raises(ValueError, match=r"--set='epochs'.*KEY=VALUE"):
        compare.parse_overrides(["epochs"])


def _run_compare(args, timeout=900):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "mixco_tf.compare", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods=mixco,byol"], "Invalid method 'byol'"),
        (["--seeds=0,x"], "Invalid --seeds value 'x'"),
        (["--metrics=top5"], "Invalid --metrics ['top5']"),
        (["--set=batch_size=7"], "batch_size=7"),
    ],
)
def test_cli_rejects_bad_flags(tmp_path, flags, message):
    result = _run_compare([f"--output_dir={tmp_path / 'out'}", *flags], timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_trains_simclr_pair_then_reuses_runs(tmp_path):
    """SimCLR and SimCLR + MixCo through the one training path, export CLI included."""
    output_dir = tmp_path / "compare"
    flags = [
        f"--output_dir={output_dir}",
        "--methods=simclr_mixco,simclr",
        "--seeds=0",
        "--set=epochs=1",
        "--set=batch_size=32",
        "--set=width_multiplier=0.0625",
        "--set=warmup_epochs=0",
        "--metrics=knn_top1",
    ]

    first = _run_compare(flags)

    assert first.returncode == 0, first.stderr[-3000:]
    comparison = json.loads((output_dir / "comparison.json").read_text())
    assert [run["method"] for run in comparison["runs"]] == ["simclr_mixco", "simclr"]
    assert comparison["runs"][0]["random_init_evaluation"] is not None
    assert comparison["runs"][1]["random_init_evaluation"] is None
    assert "| simclr_mixco − simclr | resnet18 | 0.0625 | 1 |" in first.stdout
    table = (output_dir / "comparison.md").read_text()
    # Keras prints one progress line per epoch to stdout before the table.
    assert first.stdout.endswith(table)
    results = json.loads((output_dir / "simclr-resnet18-w0.0625-seed0" / "results.json").read_text())
    assert results["config"]["temperature"] == 0.5
    assert results["final_metrics"]["mix_loss"] == 0.0
    assert "nt_xent_loss" in results["final_metrics"]

    second = _run_compare(flags)

    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("already finished") == 2
    assert second.stdout == table

    # The export CLI rebuilds a SimCLR model from the run directory.
    run_dir = output_dir / "simclr_mixco-resnet18-w0.0625-seed0"
    exported = subprocess.run(
        [sys.executable, "-m", "mixco_tf.export", f"--model_dir={run_dir}", f"--export_dir={tmp_path / 'again'}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "again" / "1" / "saved_model.pb").is_file()
