"""The experiment runner: spec validation, statistics, and a real killed-then-resumed run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from damex.errors import ConfigError
from damex.experiments import load_spec, read_results, summarize, welch_interval
from damex.experiments.cli import main as experiments_main
from damex.experiments.summary import summary_markdown

REPO = Path(__file__).resolve().parents[2]

# a tiny detector on two synthetic datasets (the test's own base config)
_TINY = {
    "data": {
        "train": ["syn_photo", "syn_signs"],
        "test": ["syn_photo", "syn_signs"],
        "scales": [64],
        "max_size": 96,
        "test_scale": 64,
        "crop": False,
        "num_workers": 0,
    },
    "model": {
        "backbone": {"name": "resnet18", "frozen_stages": 4},
        "d_model": 32,
        "nheads": 2,
        "enc_layers": 1,
        "dec_layers": 2,
        "dim_feedforward": 64,
        "num_queries": 10,
        "num_feature_levels": 3,
        "enc_n_points": 2,
        "dec_n_points": 2,
        "decoder_ffn": ["dense", "dense"],
        "dn": {"number": 4},
    },
    "moe": {"num_experts": 2, "loss": "none", "expert_map": {"syn_photo": 0, "syn_signs": 1}},
    "train": {"batch_size": 2, "warmup_iters": 1, "device": "cpu", "eval_every": 0},
    "eval": {"num_select": 20, "max_images": 1, "report_images": 0},
    "output": {"tensorboard": False},
}


def _spec(tmp_path: Path, synthetic_root: Path, **extra) -> Path:
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump(_TINY))
    spec = {
        "name": "tiny",
        "output": str(tmp_path / "out"),
        "baseline": "dense",
        "seeds": [0, 1],
        "budget": {"iterations": 1},
        "eval_splits": ["val", "test"],
        "overrides": [
            f"data.synthetic.root={synthetic_root}",
            "data.synthetic.scale=0.05",
            "data.synthetic.image_size=96",
        ],
        "variants": [
            {"name": "dense", "config": str(base)},
            {
                "name": "damex",
                "config": str(base),
                "overrides": ["model.decoder_ffn=[moe, dense]", "moe.loss=damex"],
            },
        ],
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from damex.config import SyntheticConfig
    from damex.data.synthetic import ensure_benchmark

    root = tmp_path_factory.mktemp("synthetic")
    ensure_benchmark(SyntheticConfig(root=str(root), scale=0.05, image_size=96), progress=False)
    return root


def test_spec_errors_name_the_key(tmp_path: Path, synthetic_root: Path) -> None:
    good = yaml.safe_load(_spec(tmp_path, synthetic_root).read_text())
    cases = [
        ({**good, "seed": [0]}, "unknown key(s) ['seed']"),
        ({**good, "baseline": "nope"}, "baseline 'nope' is not a variant"),
        ({**good, "budget": {"iterations": 0}}, "budget needs iterations > 0"),
        ({**good, "seeds": [1, 1]}, "seeds repeat"),
        (
            {**good, "variants": [{"name": "a", "config": str(tmp_path / "missing.yaml")}]},
            "variants[0]: config file",
        ),
        ({**good, "overrides": ["novalue"]}, "must look like key=value"),
    ]
    for i, (data, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError) as err:
            load_spec(path)
        assert message in str(err.value) and str(path) in str(err.value)


def test_welch_interval_matches_a_hand_computation() -> None:
    # a: mean 2, var 1, n 3; b: mean 0, var 0 -> se = sqrt(1/3), df = 2, t(.975, 2) = 4.302653
    diff, lo, hi = welch_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.302652729911275 * math.sqrt(1 / 3)
    assert diff == pytest.approx(2.0)
    assert (lo, hi) == pytest.approx((2.0 - half, 2.0 + half))
    # unequal variances: Welch-Satterthwaite df, checked against scipy's own Welch t-test
    from scipy import stats

    a, b = [0.31, 0.35, 0.40, 0.29], [0.20, 0.26, 0.21]
    diff, lo, hi = welch_interval(a, b)
    t = stats.ttest_ind(a, b, equal_var=False)
    se = diff / t.statistic
    df = t.df
    assert hi - diff == pytest.approx(stats.t.ppf(0.975, df) * se)
    assert welch_interval([1.0], [1.0, 2.0]) is None


def test_summarize_means_std_and_baseline_difference() -> None:
    def rec(variant: str, seed: int, ap50: float, it_s: float) -> dict:
        ds = {"a": {"AP": ap50 / 2, "AP50": ap50}, "b": {"AP": -1.0, "AP50": -1.0}}
        return {
            "variant": variant,
            "seed": seed,
            "key": f"{variant}/{seed}",
            "iterations": 5,
            "train_s": 10.0,
            "it_s": it_s,
            "metrics": {"test": {"mean": {"AP": ap50 / 2, "AP50": ap50}, "datasets": ds}},
            "routing": None,
        }

    records = [rec("base", 0, 0.2, 1.0), rec("base", 1, 0.4, 1.0), rec("moe", 0, 0.5, 0.5)]
    records.append(rec("moe", 1, 0.7, 0.7))
    s = summarize(records)
    assert s["variants"] == ["base", "moe"]
    cell = s["table"]["moe"]["test AP50"]
    assert cell["mean"] == pytest.approx(0.6) and cell["std"] == pytest.approx(
        np.std([0.5, 0.7], ddof=1)
    )
    assert s["per_dataset"]["test"]["AP50"]["base"]["a"]["mean"] == pytest.approx(0.3)
    assert "b" not in s["per_dataset"]["test"]["AP50"]["base"]  # -1 = undefined, left out
    assert s["diff"] == {}  # no baseline without a spec
    assert s["table"]["base"]["it/s"]["std"] == 0.0
    assert "test foreign %" not in s["table"]["base"]  # no run counted foreign labels


def test_summary_reports_the_mean_foreign_share_over_datasets() -> None:
    def rec(seed: int, shares: tuple[float, float]) -> dict:
        ds = {n: {"AP": 0.1, "AP50": 0.2, "foreign_share": f} for n, f in zip("ab", shares)}
        return {
            "variant": "damex",
            "seed": seed,
            "key": f"damex/{seed}",
            "metrics": {"test": {"mean": {"AP": 0.1, "AP50": 0.2}, "datasets": ds}},
            "routing": None,
        }

    s = summarize([rec(0, (0.1, 0.3)), rec(1, (0.0, 0.2))])
    cell = s["table"]["damex"]["test foreign %"]
    assert cell["values"] == pytest.approx([0.2, 0.1]) and cell["mean"] == pytest.approx(0.15)
    assert "| test foreign % |" in summary_markdown(s)


def _test_metrics(results_json: Path) -> dict:
    data = json.loads(results_json.read_text())
    return {
        "mean": {
            "AP": data["mean"]["AP"],
            "AP50": data["mean"]["AP50"],
            "VOC_AP50": data["mean"]["VOC_AP50"],
        },
        "datasets": {
            n: {
                "AP": m["ap"],
                "AP50": m["ap50"],
                "VOC_AP50": m["voc_ap50"],
                "foreign_share": m["foreign_share"],
                "num_images": m["num_images"],
            }
            for n, m in data["datasets"].items()
        },
    }


def _lines(path: Path) -> list[dict]:
    return read_results(path) if path.is_file() else []


@pytest.mark.slow  # 5 tiny training runs as real subprocesses (~1-2 min on 2 cores)
def test_runner_killed_after_first_run_resumes_to_exactly_four_runs(
    tmp_path: Path, synthetic_root: Path
) -> None:
    spec_path = _spec(tmp_path, synthetic_root)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "damex.experiments.cli", "-c", str(spec_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the training child too
    )
    try:
        deadline = time.monotonic() + 600
        while len(_lines(results)) < 1:
            assert proc.poll() is None, "the runner exited before finishing its first run"
            assert time.monotonic() < deadline, "no run finished in 10 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = _lines(results)
    assert len(first) == 1 and first[0]["variant"] == "dense" and first[0]["seed"] == 0
    assert (out / "runner.lock").is_file()  # stale lock of the killed runner

    # resume (in this process), two runs at a time
    assert experiments_main(["-c", str(spec_path), "--parallel", "2", "--threads", "1"]) == 0
    records = _lines(results)
    assert len(results.read_text().splitlines()) == 4 and len(records) == 4
    assert records[0] == first[0]  # the finished run was skipped, not redone
    assert sorted((r["variant"], r["seed"]) for r in records) == [
        ("damex", 0),
        ("damex", 1),
        ("dense", 0),
        ("dense", 1),
    ]
    for r in records:
        assert r["iterations"] == 1 and r["train_s"] > 0 and "git_commit" in r
        assert set(r["metrics"]) == {"val", "test"}
        for split in ("val", "test"):
            assert set(r["metrics"][split]["datasets"]) == {"syn_photo", "syn_signs"}
        if r["variant"] == "damex":
            routing = r["routing"]
            assert len(routing["layers"]) == 1 and routing["layers"][0]["name"] == "decoder.0"
            assert 0.5 <= routing["best_accuracy"] <= 1.0  # 2 experts: never below 1/E
            assert 0 <= routing["nmi"] <= 1
        else:
            assert r["routing"] is None
    # the two variants share seeds but not the config
    hashes = {r["variant"]: r["config_hash"] for r in records}
    assert hashes["dense"] != hashes["damex"]
    assert len({r["config_hash"] for r in records if r["variant"] == "dense"}) == 1
    # the val metrics come from an evaluation of the val annotations, the test ones from the
    # training run's final evaluation of the test annotations
    run0 = Path(records[0]["run_dir"])
    assert "syn_photo/annotations/val.json" in (run0 / "eval_val.log").read_text()
    assert "syn_photo/annotations/test.json" in (run0 / "train.log").read_text()
    assert records[0]["metrics"]["test"] == _test_metrics(run0 / "eval" / "results.json")

    summary = json.loads((out / "tiny" / "summary.json").read_text())
    for variant in ("dense", "damex"):
        rs = [r for r in records if r["variant"] == variant]
        for column, values in (
            ("it/s", [r["it_s"] for r in rs]),
            ("test AP50", [r["metrics"]["test"]["mean"]["AP50"] for r in rs]),
            ("val AP", [r["metrics"]["val"]["mean"]["AP"] for r in rs]),
        ):
            cell = summary["table"][variant][column]
            assert cell["n"] == 2
            assert cell["mean"] == pytest.approx(np.mean(values))
            assert cell["std"] == pytest.approx(np.std(values, ddof=1))
    its = summary["table"]["damex"]["it/s"]
    md = (out / "tiny" / "summary.md").read_text()
    assert "| damex | 0,1 | 1 |" in md and f"{its['mean']:.3f} ± {its['std']:.3f}" in md
    assert "Difference to **dense**" in md
    assert (out / "tiny" / "ap_per_dataset.png").stat().st_size > 0
    assert (out / "tiny" / "ap50_vs_minutes.png").stat().st_size > 0
    # a second resume has nothing left to run
    assert experiments_main(["-c", str(spec_path)]) == 0
    assert len(_lines(results)) == 4


def test_config_hash_ignores_output_seed_and_new_default_fields() -> None:
    from damex.experiments.runner import config_hash

    defaults = {"model": {"d": 128, "new_field": 0}, "train": {"seed": 1, "lr": 1e-4}}
    run = {"model": {"d": 64, "new_field": 0}, "train": {"seed": 5, "lr": 1e-4}}
    old_schema = {"model": {"d": 64}, "train": {"seed": 5, "lr": 1e-4}}
    h = config_hash(run, defaults)
    assert h == config_hash(old_schema, {"model": {"d": 128}, "train": {"seed": 1, "lr": 1e-4}})
    other_seed = {**run, "train": {"seed": 9, "lr": 1e-4}, "output": {"dir": "elsewhere"}}
    assert config_hash(other_seed, defaults) == h
    assert config_hash({**run, "train": {"seed": 5, "lr": 2e-4}}, defaults) != h
    assert config_hash({**run, "model": {"d": 64, "new_field": 1}}, defaults) != h
