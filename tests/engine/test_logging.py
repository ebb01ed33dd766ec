"""RunLogger (JSON lines, resume truncation, TensorBoard), read_jsonl, eval table."""

from __future__ import annotations

from pathlib import Path

from damex.engine.logging import RunLogger, format_eval_table, read_jsonl


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
