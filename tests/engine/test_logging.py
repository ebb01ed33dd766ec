"""RunLogger (JSON lines, resume truncation, TensorBoard), read_jsonl, eval table, progress
lines without a terminal."""

from __future__ import annotations

import io
import logging
import math
import re
import sys
from pathlib import Path

import pytest
from engine_fixtures import tiny_config

from damex.engine.logging import Progress, RunLogger, format_eval_table, read_jsonl
from damex.engine.trainer import train


def test_jsonl_records_and_resume_truncation(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, tensorboard=False)
    for i in range(1, 6):
        log.log({"iter": i, "loss": 1.0 / i, "nan": float("nan")}, step=i)
    log.log({"iter": 5, "mean_ap": 0.25}, step=5, prefix="eval")
    log.close()
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["type"] for r in recs] == ["train"] * 5 + ["eval"]
    assert recs[2]["loss"] == 1 / 3 and recs[0]["nan"] == "nan"  # strict JSON, no NaN literal
    # a killed run leaves a torn last line; resuming at iteration 3 drops everything after it
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "iter": 6, "lo')
    log = RunLogger(tmp_path, resume_iter=3)
    log.log({"iter": 4, "loss": 9.0}, step=4)
    log.close()
    assert [(r["iter"], r.get("loss")) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 9.0),
    ]  # fmt: skip
    # a new (non-resumed) run starts a fresh file
    RunLogger(tmp_path).close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    log = RunLogger(tmp_path / "x", enabled=False, tensorboard=True)
    log.log({"iter": 1, "loss": 1.0}, step=1)
    log.close()
    assert not (tmp_path / "x").exists()


def test_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(tmp_path, tensorboard=True)
    log.log({"iter": 1, "loss": 2.0, "ap": {"syn": 0.5}}, step=1)
    log.log({"iter": 2, "loss": 1.0, "ap": {"syn": 0.75}}, step=2)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [2.0, 1.0]
    assert [e.step for e in acc.Scalars("train/ap/syn")] == [1, 2]


def test_format_eval_table() -> None:
    table = format_eval_table({"a": {"AP": 0.5, "AP50": 0.75}, "bb": {"AP": 0.25}}, ("AP", "AP50"))
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "AP", "AP50"]
    assert lines[2].split() == ["a", "50.00", "75.00"] and lines[3].split() == ["bb", "25.00", "-"]
    assert lines[-1].split() == ["mean", "37.50", "75.00"]


_LINE = re.compile(
    r"iter (?P<iter>\d+)/(?P<total>\d+) \((?P<pct>[\d.]+)%\)  loss (?P<loss>\S+)  "
    r"lr (?P<lr>\S+)  (?P<it_s>[\d.]+) it/s  eta (?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)$"
)


def _progress_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, float]]:
    out = []
    for rec in caplog.records:
        m = _LINE.match(rec.getMessage())
        if m:
            d = {k: float(v) for k, v in m.groupdict().items()}
            d["eta_s"] = 3600 * d.pop("h") + 60 * d.pop("m") + d.pop("s")
            out.append(d)
    return out


def test_progress_without_a_terminal_logs_lines(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()  # not a terminal: no bar
    with caplog.at_level(logging.INFO, logger="damex.engine.logging"):
        bar = Progress(total=10, initial=2, log_every=3, file=stream)
        for i in range(8):
            bar.update(1, loss=1.0 / (i + 1), lr=1e-4)
        bar.close()
        Progress(total=10, log_every=1, file=io.StringIO(), enabled=False).update(1, loss=1.0)
    lines = _progress_lines(caplog)
    assert [d["iter"] for d in lines] == [3, 6, 9]  # every log_every-th step, resumed at 2
    assert [d["loss"] for d in lines] == pytest.approx([1.0, 0.25, 1 / 7], abs=1e-4)
    assert all(d["total"] == 10 and d["lr"] == 1e-4 and d["it_s"] > 0 for d in lines)
    assert [d["pct"] for d in lines] == [30.0, 60.0, 90.0]
    assert stream.getvalue() == ""


def test_training_without_a_terminal_logs_progress(
    synthetic_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # as with `damex train ... 2> log`
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="damex"):
        result = train(tiny_config(synthetic_root, out, epochs=2, log_every=2))
    assert result.iterations == 4
    lines = _progress_lines(caplog)
    assert [d["iter"] for d in lines] == [2, 4] and {d["total"] for d in lines} == {4}
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    assert [r["iter"] for r in records] == [2, 4]
    for d, r in zip(lines, records, strict=True):
        assert d["loss"] == pytest.approx(r["loss"], abs=1e-4)  # the same window mean
        assert d["lr"] == pytest.approx(r["lr"], rel=1e-2)
        assert d["it_s"] > 0 and math.isfinite(d["it_s"])
    # the ETA is the steps left at the measured rate
    first = lines[0]
    assert first["eta_s"] == pytest.approx(2 / first["it_s"], abs=1.0, rel=0.02)
    assert lines[-1]["eta_s"] == 0
    assert "it/s]" not in sys.stderr.getvalue()  # no tqdm bar


def test_progress_with_a_time_budget_caps_the_eta(caplog: pytest.LogCaptureFixture) -> None:
    # 1000 planned steps but a 10 s budget of which 6 s were spent before this (resumed) run:
    # the run ends within 4 s, so the ETA is at most 4 s and progress is at least 60 %
    with caplog.at_level(logging.INFO, logger="damex.engine.logging"):
        bar = Progress(
            total=1000, log_every=1, file=io.StringIO(), time_budget_s=10.0, elapsed_s=6.0
        )
        bar.update(1, loss=1.0, lr=1e-4)
        bar.close()
    (line,) = _progress_lines(caplog)
    assert line["total"] == 1000 and line["iter"] == 1
    assert line["eta_s"] <= 4
    assert 60.0 <= line["pct"] <= 61.0
