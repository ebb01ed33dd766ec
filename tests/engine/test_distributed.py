"""torch.distributed helpers: single process no-ops, and a real 2-process gloo job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from damex.engine import distributed as D


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_single_process_helpers(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    assert info.device == torch.device("cpu")
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    assert float(D.all_reduce_mean(torch.tensor(3.0))) == 3.0
    assert D.reduce_dict_mean({"x": torch.tensor(2.0)}) == {"x": 2.0}
    D.barrier()
    D.cleanup()


_SCRIPT = """
import json, os, sys, torch
from damex.engine import distributed as D
info = D.init_distributed("cpu")
r, w = info.rank, info.world_size
out = {
    "rank": r, "world": w, "backend": info.backend, "main": D.is_main_process(),
    "mean": float(D.all_reduce_mean(torch.tensor(float(r + 1)))),
    "sum": float(D.all_reduce_sum(torch.tensor([r + 1.0]))[0]),
    "gather": D.all_gather_object({"r": r, "s": "x" * r}),
    "bcast": D.broadcast_object({"from": r} if r == 0 else None),
    "dict": D.reduce_dict_mean({"b": torch.tensor(10.0 * r), "a": torch.tensor(1.0)}),
}
D.barrier()
with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
    json.dump(out, f)
D.cleanup()
"""


def test_two_process_gloo(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), str(script), str(tmp_path),
        ],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, o in enumerate(res):
        assert o["rank"] == r and o["world"] == 2 and o["backend"] == "gloo"
        assert o["main"] == (r == 0)
        assert o["mean"] == 1.5 and o["sum"] == 3.0
        assert o["gather"] == [{"r": 0, "s": ""}, {"r": 1, "s": "x"}]
        assert o["bcast"] == {"from": 0}
        assert o["dict"] == {"a": 1.0, "b": 5.0}
