"""Atomic checkpoint writes, weights_only loading, RNG capture and clear errors."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from damex.engine.checkpoint import (
    capture_rng_state,
    check_plain,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from damex.errors import CheckpointError


def _state(v: float) -> dict:
    return {
        "model": {"w": torch.full((3,), v), "b": torch.zeros(2, dtype=torch.int64)},
        "config": {"train": {"lr": 1e-4, "milestones": [33]}, "yaml": "a: 1\n"},
        "iteration": 7,
        "per_dataset": {"a": 0.5, "b": None},
        "rng": capture_rng_state(),
    }


def _files(d) -> list[str]:
    return sorted(os.listdir(d))


def test_roundtrip_weights_only(tmp_path) -> None:
    p = save_checkpoint(tmp_path / "last.pth", _state(1.0))
    got = load_checkpoint(p, required_keys=["model", "iteration"])
    assert torch.equal(got["model"]["w"], torch.ones(3))
    assert got["iteration"] == 7 and got["config"]["train"]["milestones"] == [33]
    # the file really is weights_only-loadable by plain torch
    assert torch.load(p, weights_only=True)["per_dataset"] == {"a": 0.5, "b": None}
    assert _files(tmp_path) == ["last.pth"]


class _Opaque:
    pass


def test_unsupported_value_writes_nothing_and_keeps_previous(tmp_path) -> None:
    p = tmp_path / "last.pth"
    save_checkpoint(p, _state(1.0))
    bad = _state(2.0)
    bad["extra"] = {"obj": _Opaque()}
    with pytest.raises(CheckpointError, match=r"state\['extra'\]\['obj'\].*_Opaque"):
        save_checkpoint(p, bad)
    assert _files(tmp_path) == ["last.pth"]
    assert torch.equal(load_checkpoint(p)["model"]["w"], torch.ones(3))


class _BadTensor(torch.Tensor):
    """Passes the structure check only if subclasses were allowed; pickling it fails."""


_FSIZE_SCRIPT = """
import resource, signal, sys, torch
from damex.engine.checkpoint import save_checkpoint
from damex.errors import CheckpointError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    save_checkpoint(sys.argv[1], {"model": {"w": torch.zeros(1_000_000)}})
except CheckpointError as e:
    print("CheckpointError:", e)
    sys.exit(3)
"""


def test_failure_during_write_removes_tmp_and_keeps_previous(tmp_path) -> None:
    # a real mid-write failure: the file-size limit makes write() fail with EFBIG halfway
    p = tmp_path / "last.pth"
    save_checkpoint(p, _state(1.0))
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE_SCRIPT, str(p)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert "last.pth" in proc.stdout and "File too large" in proc.stdout  # the OS error, named
    assert _files(tmp_path) == ["last.pth"]
    assert torch.equal(load_checkpoint(p)["model"]["w"], torch.ones(3))


def test_tensor_subclass_rejected() -> None:
    with pytest.raises(CheckpointError, match="tensor subclass"):
        check_plain({"x": torch.zeros(2).as_subclass(_BadTensor)})


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_readonly_directory_error_names_file(tmp_path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    save_checkpoint(d / "last.pth", _state(1.0))
    d.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="last.pth"):
            save_checkpoint(d / "last.pth", _state(2.0))
    finally:
        d.chmod(0o700)
    assert _files(d) == ["last.pth"]
    assert torch.equal(load_checkpoint(d / "last.pth")["model"]["w"], torch.ones(3))


def test_missing_corrupt_and_incomplete_checkpoints(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    p = save_checkpoint(tmp_path / "c.pth", _state(1.0))
    data = p.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pth"):
        load_checkpoint(tmp_path / "trunc.pth")
    with pytest.raises(CheckpointError, match=r"lacks keys \['optimizer', 'scheduler'\]"):
        load_checkpoint(p, required_keys=["model", "optimizer", "scheduler"])
    # a pickle that needs arbitrary code is refused by weights_only loading
    torch.save({"obj": _Opaque()}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="unsafe.pth"):
        load_checkpoint(tmp_path / "unsafe.pth")
    assert zipfile.is_zipfile(p)


def test_load_model_state_lists_mismatches(tmp_path) -> None:
    src = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    dst = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1), nn.ReLU())
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}  # DDP prefix stripped
    with pytest.raises(CheckpointError, match=r"x.pth.*0\.weight: checkpoint \(3, 2\) vs model"):
        load_model_state(dst, sd, path="x.pth")
    same = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    load_model_state(same, sd, path="x.pth")
    assert torch.equal(same[0].weight, src[0].weight)
    bigger = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1), nn.Linear(1, 1))
    with pytest.raises(CheckpointError, match=r"missing keys \['2.weight', '2.bias'\]"):
        load_model_state(bigger, sd, path="x.pth")


def test_rng_state_roundtrip_through_file(tmp_path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "r.pth", {"rng": capture_rng_state()})
    want = (
        torch.rand(4),
        np.random.rand(4),
        np.random.randn(),
        [random.random() for _ in range(3)],
    )
    restore_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"])
    got = (torch.rand(4), np.random.rand(4), np.random.randn(), [random.random() for _ in range(3)])
    assert torch.equal(want[0], got[0])
    np.testing.assert_array_equal(want[1], got[1])
    assert want[2] == got[2] and want[3] == got[3]
