"""A torchrun worker that raises mid-training: every rank stops within 60 s, the failing rank's
error is printed, and the checkpoint written before is intact."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from fault_setup import fault_config_dict

from damex.engine.checkpoint import load_checkpoint

# Rank 1 raises in its training loop when it collates its 3rd batch (after the first
# checkpoint); rank 0 is then inside or on its way to a collective with rank 1.
_JOB = """
import os, sys, time
import damex.data.loader as loader

if int(os.environ["RANK"]) == 1:
    real = loader.collate
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            with open(sys.argv[2], "w") as f:
                f.write(repr(time.time()))
            raise RuntimeError("injected fault on rank 1 at its 3rd batch")
        return real(*args, **kwargs)

    loader.collate = failing

from damex.cli import main
sys.exit(main(["train", "-c", sys.argv[1], "--no-report"]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_failing_rank_stops_every_rank_and_is_printed(
    fault_synthetic_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = fault_config_dict(fault_synthetic_root, out, batch_size=1, epochs=3)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "job.py").write_text(_JOB)
    fault_at = tmp_path / "fault_time"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), str(tmp_path / "job.py"),
            str(tmp_path / "cfg.yaml"), str(fault_at),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = time.time()
    assert fault_at.is_file(), f"the fault was never injected (exit {proc.returncode}):\n{stderr}"
    assert proc.returncode != 0
    waited = stopped_at - float(fault_at.read_text())
    print(f"every rank stopped {waited:.1f} s after the fault")
    assert waited < 60, f"ranks took {waited:.0f} s to stop after the fault"
    assert "injected fault on rank 1 at its 3rd batch" in stderr, stderr[-4000:]
    # torchrun's failure summary names the failing rank and its error (not "<N/A>")
    root_cause = stderr[stderr.rindex("Root Cause") :]
    assert "rank      : 1" in root_cause and "injected fault on rank 1" in root_cause, root_cause
    # the checkpoint written before the fault (end of epoch 1) is intact and loadable
    state = load_checkpoint(out / "last.pth")
    assert state["trainer"]["iteration"] >= 1
    assert not list(out.glob(".*.tmp"))
