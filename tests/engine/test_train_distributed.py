"""Two-process (torchrun, gloo, CPU) training: DDP keeps replicas equal, rank 0 writes the run,
and an interrupted distributed run resumes exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_fixtures import tiny_config_dict

from damex.engine.checkpoint import load_checkpoint
from damex.engine.logging import read_jsonl

_SCRIPT = """
import hashlib, json, sys
import torch
from damex.config import config_from_dict
from damex.engine import distributed as D
from damex.engine.trainer import _Trainer, train

torch.set_num_threads(1)
info = D.init_distributed("cpu")  # train() then leaves the group alive
cfgs = json.loads(open(sys.argv[1]).read())
out = {}
t = _Trainer(config_from_dict(cfgs["full"]), None)
t.setup()
res = t.fit()
h = hashlib.sha256()
for k, v in sorted(t.model.state_dict().items()):
    h.update(k.encode()); h.update(v.detach().contiguous().numpy().tobytes())
out["hash"] = h.hexdigest()
out["iterations"] = res.iterations
train(config_from_dict(cfgs["part"]))
res = train(config_from_dict(cfgs["resume"]), resume=True)
out["resumed_iterations"] = res.iterations
with open(f"{sys.argv[2]}/rank{info.rank}.json", "w") as f:
    json.dump(out, f)
D.cleanup()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _losses(path: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k in ("iter", "lr") or k.startswith("loss")}
        for r in read_jsonl(path)
        if r["type"] == "train"
    ]


@pytest.mark.slow
def test_two_process_training_and_exact_resume(synthetic_root: Path, tmp_path: Path) -> None:
    # batch 1 per rank, 2 global batches per epoch -> 2 steps per epoch, 2 epochs
    common = {"epochs": 2, "batch_size": 1, "ema": True}
    cfgs = {
        "full": tiny_config_dict(synthetic_root, tmp_path / "full", **common),
        "part": tiny_config_dict(synthetic_root, tmp_path / "part", **common, max_iters=3),
        "resume": tiny_config_dict(synthetic_root, tmp_path / "part", **common),
    }
    (tmp_path / "cfgs.json").write_text(json.dumps(cfgs))
    (tmp_path / "job.py").write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), str(tmp_path / "job.py"),
            str(tmp_path / "cfgs.json"), str(tmp_path),
        ],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["iterations"] == ranks[1]["iterations"] == 4
    assert ranks[0]["hash"] == ranks[1]["hash"]  # DDP: identical replicas after training
    assert ranks[0]["resumed_iterations"] == 4

    state = load_checkpoint(tmp_path / "full" / "last.pth")
    assert state["trainer"]["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # seed + rank
    full = _losses(tmp_path / "full" / "metrics.jsonl")
    assert [r["iter"] for r in full] == [1, 2, 3, 4]
    assert _losses(tmp_path / "part" / "metrics.jsonl") == full
