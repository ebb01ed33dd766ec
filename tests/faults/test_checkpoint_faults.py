"""Checkpoint faults without a training run: damaged files, the kept previous checkpoint, a full
disk in the middle of a write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from fault_setup import DiskFullFile

from damex.engine import checkpoint as ckpt
from damex.engine.checkpoint import (
    load_checkpoint,
    load_checkpoint_with_fallback,
    previous_path,
    save_checkpoint,
    verify_checkpoint_file,
)
from damex.errors import CheckpointError


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((64, 64), v)}, "iteration": int(v)}


def _w(state: dict) -> float:
    return float(state["model"]["w"][0, 0])


def test_keep_previous_rotates_the_last_good_checkpoint(tmp_path: Path) -> None:
    last = tmp_path / "last.pth"
    save_checkpoint(last, _state(1.0), keep_previous=True)
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]  # nothing to keep yet
    save_checkpoint(last, _state(2.0), keep_previous=True)
    save_checkpoint(last, _state(3.0), keep_previous=True)
    assert sorted(os.listdir(tmp_path)) == ["last.prev.pth", "last.pth"]
    assert previous_path(last) == tmp_path / "last.prev.pth"
    assert _w(load_checkpoint(last)) == 3.0
    assert _w(load_checkpoint(tmp_path / "last.prev.pth")) == 2.0
    # without keep_previous (best.pth, epoch files) nothing else appears
    save_checkpoint(tmp_path / "best.pth", _state(4.0))
    save_checkpoint(tmp_path / "best.pth", _state(5.0))
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.prev.pth", "last.pth"]


def _flip_byte_in_tensor_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    raw = torch.full((64, 64), 2.0).numpy().tobytes()[:64]
    at = bytes(data).index(raw) + 40  # inside the stored tensor, not the zip index
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_tensor_bytes_are_detected(tmp_path: Path) -> None:
    """torch.load alone returns the damaged weights silently; the CRC check catches it."""
    p = save_checkpoint(tmp_path / "last.pth", _state(2.0))
    _flip_byte_in_tensor_data(p)
    silently = torch.load(p, weights_only=True)["model"]["w"]
    assert not torch.equal(silently, torch.full((64, 64), 2.0))  # what plain torch.load gives
    with pytest.raises(CheckpointError, match=r"last\.pth is corrupt: entry .* CRC"):
        load_checkpoint(p)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", r"last\.pth is truncated or not a torch checkpoint \(\d+ bytes"),
        ("empty", r"last\.pth is empty \(0 bytes\)"),
        ("flip", r"last\.pth is corrupt"),
        ("text", r"last\.pth is truncated or not a torch checkpoint"),
    ],
)
def test_unusable_last_falls_back_to_previous(tmp_path: Path, damage: str, message: str) -> None:
    last = tmp_path / "last.pth"
    save_checkpoint(last, _state(1.0), keep_previous=True)
    save_checkpoint(last, _state(2.0), keep_previous=True)
    data = last.read_bytes()
    if damage == "truncate":
        last.write_bytes(data[: len(data) // 3])
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "flip":
        _flip_byte_in_tensor_data(last)
    else:
        last.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint_file(last)
    state, used = load_checkpoint_with_fallback(last, required_keys=["model"])
    assert used == tmp_path / "last.prev.pth" and _w(state) == 1.0
    # the next save does not keep the damaged file as "previous": the good one stays
    save_checkpoint(last, _state(3.0), keep_previous=True)
    assert _w(load_checkpoint(tmp_path / "last.prev.pth")) == 1.0
    assert _w(load_checkpoint(last)) == 3.0


def test_no_fallback_names_both(tmp_path: Path) -> None:
    last = tmp_path / "last.pth"
    last.write_bytes(b"PK\x03\x04 junk")
    with pytest.raises(CheckpointError, match=r"last\.pth is truncated.*no previous checkpoint"):
        load_checkpoint_with_fallback(last)
    (tmp_path / "last.prev.pth").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"last\.pth is trunc.*unusable too.*prev\.pth is empty"
    ):
        load_checkpoint_with_fallback(last)
    # missing keys count as unusable too (e.g. a weights-only best.pth copied over last.pth)
    save_checkpoint(tmp_path / "last.prev.pth", {**_state(1.0), "optimizer": {}})
    save_checkpoint(last, _state(2.0))
    state, used = load_checkpoint_with_fallback(last, required_keys=["model", "optimizer"])
    assert used.name == "last.prev.pth"


def test_disk_full_mid_write_keeps_last_and_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    last = tmp_path / "last.pth"
    save_checkpoint(last, _state(1.0), keep_previous=True)
    save_checkpoint(last, _state(2.0), keep_previous=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    written: list[int] = []

    def fdopen(fd: int, mode: str = "r", *args, **kwargs):
        assert mode == "wb"
        f = DiskFullFile(fd, budget=10_000)  # the state is ~17 kB: fails halfway
        written.append(fd)
        return f

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last\.pth: .*No space"):
        save_checkpoint(last, _state(3.0), keep_previous=True)
    monkeypatch.undo()
    assert written, "the failing file was not used"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no tmp file left
    assert _w(load_checkpoint(last)) == 2.0


def test_disk_full_during_training_stops_the_run_with_a_clear_message(
    fault_synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`damex train`: the 2nd last.pth write hits a full disk -> exit 2, one line naming the
    file and ENOSPC, the checkpoint of step 1 intact."""
    import yaml
    from fault_setup import fault_config_dict

    from damex.cli import main

    out = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(fault_config_dict(fault_synthetic_root, out)))
    real_fdopen = os.fdopen
    opened: list[str] = []

    def fdopen(fd: int, mode: str = "r", *args, **kwargs):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(".last.pth.") and name.endswith(".tmp"):
            opened.append(name)
            if len(opened) == 2:  # the disk is full from the second checkpoint on
                return DiskFullFile(fd, budget=100_000)
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    capsys.readouterr()
    code = main(["train", "-c", str(tmp_path / "cfg.yaml"), "--no-report"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert code == 2 and len(lines) == 1, err
    assert f"cannot write checkpoint {out / 'last.pth'}" in lines[0]
    assert "No space left on device" in lines[0] and "unchanged" in lines[0]
    state = load_checkpoint(out / "last.pth")
    assert state["trainer"]["iteration"] == 1  # the step-1 checkpoint survived
    assert not list(out.glob(".*.tmp"))
