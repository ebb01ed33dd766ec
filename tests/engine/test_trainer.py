"""End-to-end training on the tiny synthetic benchmark: logging, checkpoints, evaluation,
exact resume (mid-epoch and after a SIGKILL), non-finite stops, time budget."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_fixtures import REF, REF_ITERS, TRAIN_SETS, tiny_config, tiny_config_dict

from damex.engine.checkpoint import load_checkpoint
from damex.engine.loading import evaluate
from damex.engine.logging import read_jsonl
from damex.engine.trainer import TrainingError, train
from damex.errors import CheckpointError, ConfigError


def _train_records(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]


def _losses(records: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k == "iter" or k == "lr" or k.startswith("loss")}
        for r in records
    ]


def test_train_logs_checkpoints_and_evaluates(synthetic_root: Path, reference_run: Path) -> None:
    records = _train_records(reference_run)
    assert [r["iter"] for r in records] == list(range(1, REF_ITERS + 1))
    assert [r["epoch"] for r in records] == [i // 2 for i in range(REF_ITERS)]
    first = records[0]
    for key in ("lr", "loss", "loss_class", "loss_bbox", "loss_giou", "loss_moe", "it_s", "time"):
        assert key in first and math.isfinite(first[key]), key
    # warmup: 2-step linear ramp on the default group's lr
    assert [r["lr"] for r in records[:3]] == pytest.approx([0.5e-4, 1e-4, 1e-4])
    # the total is the sum of the weighted terms
    terms = sum(v for k, v in first.items() if k.startswith("loss_"))
    assert first["loss"] == pytest.approx(terms, rel=1e-5)

    evals = [r for r in read_jsonl(reference_run / "metrics.jsonl") if r["type"] == "eval"]
    assert len(evals) == 1 and evals[0]["iter"] == REF_ITERS and evals[0]["final"]
    assert {f"ap/{n}" for n in TRAIN_SETS} <= set(evals[0])

    state = load_checkpoint(reference_run / "last.pth")
    assert state["trainer"]["iteration"] == REF_ITERS and state["trainer"]["epoch"] == 3
    assert state["expert_map"] == {"syn_photo": 0, "syn_signs": 1}
    assert state["label_space"]["names"] and state["config"]["train"]["epochs"] == 3
    assert state["ema"]["updates"] == REF_ITERS
    assert (reference_run / "best.pth").is_file() and (reference_run / "config.yaml").is_file()
    final = json.loads((reference_run / "eval" / "results.json").read_text())
    assert final["mean"]["AP"] == evals[0]["mean_ap"]

    # evaluate() on the checkpoint reproduces the final evaluation (EMA weights)
    cfg = tiny_config(synthetic_root, reference_run, **REF)
    results = evaluate(cfg, reference_run / "last.pth")
    assert set(results.datasets) == set(TRAIN_SETS)
    assert results.mean_ap == pytest.approx(evals[0]["mean_ap"], abs=1e-9)
    best = load_checkpoint(reference_run / "best.pth")
    assert best["weights"] == "ema" and "optimizer" not in best


def test_refuses_to_overwrite_a_run(synthetic_root: Path, reference_run: Path) -> None:
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config(synthetic_root, reference_run, **REF))


def test_exact_resume_mid_epoch(synthetic_root: Path, reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    part = train(tiny_config(synthetic_root, out, **REF, max_iters=3))  # stops inside epoch 2
    assert part.stop_reason == "max_iters" and part.iterations == 3
    state = load_checkpoint(out / "last.pth")
    assert state["trainer"]["epoch_micro"] == 1 and state["sampler"]["global_batches_consumed"] == 1
    done = train(tiny_config(synthetic_root, out, **REF), resume=True)
    assert done.iterations == REF_ITERS
    assert _losses(_train_records(out)) == _losses(_train_records(reference_run))
    a = load_checkpoint(out / "last.pth")
    b = load_checkpoint(reference_run / "last.pth")
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    for k, v in b["ema"]["module"].items():
        assert torch.equal(a["ema"]["module"][k], v), k


_RUN_SCRIPT = """
import json, sys
import torch
from damex.config import config_from_dict
from damex.engine.trainer import train
torch.set_num_threads(int(sys.argv[2]))  # the test process's: same float reductions
train(config_from_dict(json.loads(open(sys.argv[1]).read())))
"""


def test_sigkill_then_resume_equals_uninterrupted(
    synthetic_root: Path, reference_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(tiny_config_dict(synthetic_root, out, **REF)))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN_SCRIPT, str(cfg_file), str(torch.get_num_threads())],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pth").exists():  # written at the end of epoch 1
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(out / "last.pth")["trainer"]["iteration"]
    assert 0 < killed_at < REF_ITERS
    done = train(tiny_config(synthetic_root, out, **REF), resume=True)
    assert done.iterations == REF_ITERS
    # lines the killed run wrote after its checkpoint were dropped; the rest equals the reference
    assert _losses(_train_records(out)) == _losses(_train_records(reference_run))


def test_nonfinite_losses_stop_the_run(synthetic_root: Path, tmp_path: Path) -> None:
    # AdamW moves every weight by ~lr on the first step: lr=1e30 makes every later loss NaN/inf
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"3 consecutive non-finite.*last\.pth is kept"):
        train(tiny_config(synthetic_root, out, lr=1e30, max_nonfinite=3, epochs=5))
    state = load_checkpoint(out / "last.pth")  # written at the end of epoch 1, left untouched
    assert state["trainer"]["iteration"] == 2
    assert state["trainer"]["nonfinite_total"] == 1
    records = _train_records(out)
    assert records[-1]["nonfinite"] == 2 and records[0]["nonfinite"] == 0


def test_time_budget_and_time_cosine(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    budget_s = 3.0
    cfg = tiny_config(
        synthetic_root, out, epochs=50, schedule="time_cosine", time_budget_min=budget_s / 60
    )
    result = train(cfg)
    assert result.stop_reason == "time_budget" and result.elapsed_s >= budget_s
    assert result.final_results is not None and (out / "last.pth").is_file()
    records = _train_records(out)
    assert records and records[-1]["time"] >= budget_s  # (one slow step may take it all)
    assert records[0]["lr"] == pytest.approx(1e-4)
    # the lr of a step is the cosine of the elapsed training time when the previous step ended
    for prev, rec in zip(records, records[1:]):
        progress = min(prev["time"] / budget_s, 1.0)
        assert rec["lr"] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert load_checkpoint(out / "last.pth")["scheduler"]["lr_lambdas"][0]["elapsed_s"] >= budget_s


def test_resume_from_a_corrupt_checkpoint_names_the_file(
    synthetic_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match="last.pth"):
        train(tiny_config(synthetic_root, out), resume=True)
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        train(tiny_config(synthetic_root, out), resume=str(tmp_path / "nope.pth"))


def test_sigterm_stops_cleanly_with_a_checkpoint(synthetic_root: Path, tmp_path: Path) -> None:
    import threading

    out = tmp_path / "run"

    def send_sigterm_once_training() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # the handler is installed once steps are logged
            if (out / "metrics.jsonl").is_file() and _train_records(out):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    sender = threading.Thread(target=send_sigterm_once_training, daemon=True)
    sender.start()
    result = train(tiny_config(synthetic_root, out, epochs=1000))
    sender.join(timeout=10)
    assert result.stop_reason == "signal" and result.final_results is None
    state = load_checkpoint(out / "last.pth")
    assert state["trainer"]["iteration"] == result.iterations < 2000
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed
