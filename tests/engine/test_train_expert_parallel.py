"""``moe.expert_parallel=true`` end to end through the trainer: ``torchrun``, 2 gloo processes.

The same tiny DAMEX run (EMA on, final evaluation on uneven 2-rank shards) trained with the
experts spread over the 2 ranks and with replicated experts gives the same losses, checkpoints
(``last.pth`` with model / optimizer / EMA, ``best.pth``) and routing statistics; the
expert-parallel checkpoint evaluates on one process to the AP of the distributed evaluation and
resumes on one process like the replicated run's checkpoint; the Python predictor loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_fixtures import tiny_config_dict

from damex.config import config_from_dict
from damex.engine.checkpoint import load_checkpoint
from damex.engine.loading import evaluate
from damex.engine.logging import read_jsonl
from damex.engine.trainer import train
from damex.predictor import Predictor

_SCRIPT = """
import json, sys
import torch
from damex.config import config_from_dict
from damex.engine import distributed as D
from damex.engine.trainer import train
from damex.predictor import Predictor

torch.set_num_threads(1)
info = D.init_distributed("cpu")
cfgs = json.loads(open(sys.argv[1]).read())
out = {}
for mode in ("ep", "rep"):
    res = train(config_from_dict(cfgs[mode]))
    out[mode] = {
        "iterations": res.iterations,
        "routing": None if res.final_routing is None else res.final_routing.to_dict(),
    }
with open(f"{sys.argv[2]}/rank{info.rank}.json", "w") as f:
    json.dump(out, f)
D.cleanup()
"""

TOL = dict(rtol=1e-5, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cfg_dict(root: Path, out: Path, *, expert_parallel: bool, **train: object) -> dict:
    d = tiny_config_dict(root, out, **{"epochs": 1, "batch_size": 1, "ema": True, **train})
    d["moe"]["expert_parallel"] = expert_parallel
    d["eval"]["max_images"] = 3  # 3 images per dataset: uneven 2 + 1 rank shards
    return d


def _losses(run: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k == "iter" or k.startswith("loss")}
        for r in read_jsonl(run / "metrics.jsonl")
        if r["type"] == "train"
    ]


def _close(a: object, b: object, what: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{what}: keys differ"
        for k in a:
            _close(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, **TOL, msg=what)
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{what}: {a} != {b}"
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


@pytest.mark.slow  # torchrun + 2 two-process runs + 2 resumes (~40 s of CPU); CI runs it
def test_expert_parallel_trainer_equals_replicated(synthetic_root: Path, tmp_path: Path) -> None:
    runs = {m: tmp_path / m for m in ("ep", "rep")}
    cfgs = {m: _cfg_dict(synthetic_root, runs[m], expert_parallel=m == "ep") for m in ("ep", "rep")}
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
    assert ranks[0]["ep"]["iterations"] == ranks[0]["rep"]["iterations"] == 2

    # same losses, weights, AdamW moments, EMA; single-process checkpoint layout
    assert [r["iter"] for r in _losses(runs["ep"])] == [1, 2]
    _close(_losses(runs["ep"]), _losses(runs["rep"]), "losses")
    ep, rep = (load_checkpoint(runs[m] / "last.pth") for m in ("ep", "rep"))
    assert ep["trainer"]["world_size"] == 2
    for key in ("model", "optimizer", "ema"):
        _close(ep[key], rep[key], key)
    assert any(".experts.ffn.1." in k for k in ep["model"])  # rank 1's expert was gathered
    _close(
        load_checkpoint(runs["ep"] / "best.pth")["model"],
        load_checkpoint(runs["rep"] / "best.pth")["model"],
        "best.pth",
    )
    # the distributed evaluation (lockstep over uneven shards) routed like the replicated one
    assert ranks[0]["ep"]["routing"] is not None
    assert ranks[0]["ep"]["routing"]["top1"] == ranks[0]["rep"]["routing"]["top1"]
    assert ranks[0]["ep"]["routing"] == ranks[1]["ep"]["routing"]  # summed over ranks

    # one process: the expert-parallel checkpoint evaluates to the distributed evaluation's AP
    cfg_ep = config_from_dict(cfgs["ep"])
    dist_ap = json.loads((runs["ep"] / "eval" / "results.json").read_text())
    single = json.loads(evaluate(cfg_ep, runs["ep"] / "last.pth").to_json())
    _close(single, dist_ap, "evaluation")  # every dataset's AP, AP50, ..., AR100

    # ... and loads into the Python predictor on one process (strict, EMA weights)
    predictor = Predictor.from_run(runs["ep"], checkpoint="last.pth")
    _close(predictor.model.state_dict(), ep["ema"]["module"], "predictor weights")
    image = next(synthetic_root.rglob("test_*.jpg"))
    assert int(predictor.routing_counts([image]).sum()) == cfgs["ep"]["model"]["num_queries"]

    # W=2 -> W=1: both checkpoints continue with the same losses through the trainer
    cont = {}
    for mode in ("ep", "rep"):
        out = tmp_path / f"{mode}_resumed"
        shutil.copytree(runs[mode], out)
        d = _cfg_dict(synthetic_root, out, expert_parallel=True, epochs=2)
        res = train(config_from_dict(d), resume=True)
        assert res.iterations == 6  # 2 steps on 2 ranks, then 4 per epoch on 1 process
        cont[mode] = _losses(out)[2:]
    assert [r["iter"] for r in cont["ep"]] == [3, 4, 5, 6]
    _close(cont["ep"], cont["rep"], "resumed on one process")
