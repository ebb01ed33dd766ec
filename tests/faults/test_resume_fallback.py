"""`--resume` with a truncated or damaged last.pth falls back to last.prev.pth (kept by every
checkpoint write) and continues exactly: same losses, same final weights."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from fault_setup import FAULT_EPOCHS, fault_config_dict

from damex.config import config_from_dict
from damex.engine.checkpoint import load_checkpoint
from damex.engine.logging import read_jsonl
from damex.engine.trainer import train
from damex.errors import CheckpointError


def _losses(run: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k in ("iter", "lr") or k.startswith("loss")}
        for r in read_jsonl(run / "metrics.jsonl")
        if r["type"] == "train"
    ]


def test_reference_run_keeps_the_previous_checkpoint(fault_reference_run: Path) -> None:
    last = load_checkpoint(fault_reference_run / "last.pth")["trainer"]["iteration"]
    prev = load_checkpoint(fault_reference_run / "last.prev.pth")["trainer"]["iteration"]
    assert last == FAULT_EPOCHS and prev == FAULT_EPOCHS - 1


def test_truncated_last_falls_back_and_resumes_exactly(
    fault_synthetic_root: Path,
    fault_reference_run: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "run"
    shutil.copytree(fault_reference_run, out)
    last = out / "last.pth"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a crash of the disk, not of damex
    cfg = config_from_dict(fault_config_dict(fault_synthetic_root, out))
    with caplog.at_level(logging.WARNING):
        result = train(cfg, resume=True)
    warned = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert warned and "last.pth is truncated" in warned[0] and "last.prev.pth" in warned[0]
    assert result.iterations == FAULT_EPOCHS
    assert _losses(out) == _losses(fault_reference_run)  # step 5 redone, identical
    a, b = load_checkpoint(last), load_checkpoint(fault_reference_run / "last.pth")
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key


def test_both_unusable_is_a_clear_error(
    fault_synthetic_root: Path, fault_reference_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(fault_reference_run, out)
    (out / "last.pth").write_bytes(b"")
    prev = out / "last.prev.pth"
    prev.write_bytes(prev.read_bytes()[:1000])
    cfg = config_from_dict(fault_config_dict(fault_synthetic_root, out))
    with pytest.raises(CheckpointError, match=r"last\.pth is empty.*last\.prev\.pth is trunc"):
        train(cfg, resume=True)
