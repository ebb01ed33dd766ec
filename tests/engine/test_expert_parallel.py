"""Expert parallelism of the whole detector with 2 real gloo processes (``mp.spawn``, CPU).

One spawned job trains the tiny DAMEX detector (E=4, one MoE decoder layer) for 3 steps twice
from the same seed, with replicated experts and with 2 experts per rank, through the engine's
pieces (``wrap_ddp``, ``finish_expert_grads_``, ``clip_grad_norm_``, the gathered checkpoint);
both resume the same single-process checkpoint (W=1 -> W=2) and run an uneven inference shard.
The test process then checks: equal losses, gradient norms, parameters and AdamW moments
(1e-5); checkpoints keyed and ordered like the single-process model's; W=2 -> W=1 resume of
both checkpoints gives the same losses; routing statistics equal the single-process ones.
"""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from engine_fixtures import tiny_config_dict

from damex.config import config_from_dict
from damex.engine.checkpoint import load_checkpoint, save_checkpoint
from damex.engine.expert_parallel import (
    clip_grad_norm_,
    finish_expert_grads_,
    gather_model_state,
    gather_optimizer_state,
    inference_lockstep,
    load_model_state,
    load_optimizer_state,
    wrap_ddp,
)
from damex.engine.optim import build_optimizer
from damex.modeling import build_model
from damex.modeling.criterion import build_criterion
from damex.moe.stats import RoutingStats
from damex.structures import Batch, Target

WORLD = 2
NUM_EXPERTS = 4
NUM_CLASSES = 5
SIZE = 64
TOL = dict(rtol=1e-5, atol=1e-5)


def _cfg(tmp: Path):
    d = tiny_config_dict(tmp / "syn", tmp / "out", clip_max_norm=0.1)
    d["moe"] = {"num_experts": NUM_EXPERTS, "expert_map": {"syn_photo": 0, "syn_signs": 3}}
    return config_from_dict(d)


def _image(step: int, i: int) -> tuple[torch.Tensor, Target, int]:
    """Image ``i`` of global batch ``step``: 3 boxes each (DN groups equal on every rank)."""
    g = torch.Generator().manual_seed(1000 * step + i)
    img = torch.rand(3, SIZE, SIZE, generator=g) * 255
    centre = 0.25 + 0.5 * torch.rand(3, 2, generator=g)
    wh = 0.1 + 0.2 * torch.rand(3, 2, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (3,), generator=g)
    return img, Target(torch.cat([centre, wh], 1), labels), i % 2


def _batch(items: list[tuple[torch.Tensor, Target, int]]) -> Batch:
    n = len(items)
    ds = torch.tensor([d for _, _, d in items])
    return Batch(
        images=torch.stack([im for im, _, _ in items]),
        mask=torch.zeros(n, SIZE, SIZE, dtype=torch.bool),
        targets=[t for _, t, _ in items],
        dataset_ids=ds,
        expert_ids=torch.tensor([0, 3])[ds],
        image_ids=torch.arange(n),
        image_sizes=torch.full((n, 2), SIZE),
        orig_sizes=torch.full((n, 2), SIZE),
    )


def _step_batch(step: int, rank: int, world: int) -> Batch:
    """Rank ``rank``'s share of the 2-image global batch of ``step``."""
    return _batch([_image(step, i) for i in range(2) if i % world == rank])


def _build(cfg, expert_parallel: bool):
    torch.manual_seed(0)
    model = build_model(cfg.model, replace(cfg.moe, expert_parallel=expert_parallel), NUM_CLASSES)
    criterion = build_criterion(cfg, NUM_CLASSES)
    optimizer = build_optimizer(model, cfg.train)
    ddp = wrap_ddp(model, device=torch.device("cpu")) if dist.is_initialized() else model
    return model, criterion, optimizer, ddp


def _steps(model, ddp, criterion, optimizer, steps: range, seed: int) -> list[list[float]]:
    """The trainer's optimizer step; returns ``[loss averaged over ranks, grad norm]`` per step."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(seed + rank)  # gate noise, DN noise, DropPath: per-rank streams
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = []
    ddp.train()
    for step in steps:
        batch = _step_batch(step, rank, world)
        loss = criterion(ddp(batch), batch)["loss"]
        loss.backward()
        finish_expert_grads_(model)
        norm = clip_grad_norm_(model, params, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
        out.append([float(mean) / world, float(norm)])
    return out


def _state(model, optimizer) -> dict | None:
    m = gather_model_state(model)
    o = gather_optimizer_state(model, optimizer)
    return None if m is None else {"model": m, "optimizer": o}


def _routing(model, images: list[int], rank: int = 0) -> RoutingStats:
    """Routing statistics over this rank's images (one per forward), summed over ranks."""
    stats = RoutingStats(1, 2, NUM_EXPERTS)
    model.eval()
    with torch.no_grad():
        i = 0
        while inference_lockstep(model, i < len(images)):
            if i < len(images):
                batch = _batch([_image(99, images[i])])
                stats.update(model(batch).routing, batch.dataset_ids)
            i += 1
    if dist.is_initialized():
        stats.all_reduce_()
    return stats


def _job(rank: int, tmp: Path) -> None:
    torch.set_num_threads(1)
    cfg = _cfg(tmp)

    def save(state: dict | None, name: str) -> None:  # now: state dicts alias live tensors
        if rank == 0:
            save_checkpoint(tmp / name, state)

    for mode in ("replicated", "ep"):
        model, criterion, optimizer, ddp = _build(cfg, mode == "ep")
        if mode == "ep":  # E/W experts here, and only those in the optimizer
            held = [n for n, _ in model.named_parameters() if ".experts.ffn." in n]
            assert {n.split(".experts.ffn.")[1].split(".")[0] for n in held} == {
                str(2 * rank),
                str(2 * rank + 1),
            }
            in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
            assert all(id(p) in in_opt for _, p in model.named_parameters() if p.requires_grad)
        log = _steps(model, ddp, criterion, optimizer, range(2), seed=10)
        save(_state(model, optimizer), f"{mode}_step2.pth")
        log += _steps(model, ddp, criterion, optimizer, range(2, 3), seed=20)
        save(_state(model, optimizer), f"{mode}_step3.pth")
        routing = _routing(model, [0, 1] if rank == 0 else [2])  # uneven shards: 2 + 1
        # W=1 -> W=2: the single-process checkpoint resumes on 2 ranks
        single = load_checkpoint(tmp / "w1_step2.pth")
        model, criterion, optimizer, ddp = _build(cfg, mode == "ep")
        load_model_state(model, single["model"], path="w1_step2.pth")
        load_optimizer_state(model, optimizer, single["optimizer"], path="w1_step2.pth")
        resumed = _steps(model, ddp, criterion, optimizer, range(2, 4), seed=30)
        if rank == 0:
            out = {"log": log, "resumed": resumed, "routing": routing.to_dict()}
            torch.save(out, tmp / f"{mode}_log.pt")
        dist.barrier()


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        _job(rank, Path(tmp))
    except BaseException:
        Path(tmp, f"err.{rank}").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _close(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert list(a) == list(b), f"{what}: keys differ"
        for k in a:
            _close(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, **TOL, msg=what)
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{what}: {a} != {b}"
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def test_expert_parallel_training_equals_replicated_and_resumes_across_world_sizes(
    tmp_path: Path, single_thread: None
) -> None:
    cfg = _cfg(tmp_path)
    # the single-process run: 2 steps on the full global batches -> the W=1 checkpoint
    model, criterion, optimizer, ddp = _build(cfg, expert_parallel=False)
    _steps(model, ddp, criterion, optimizer, range(2), seed=10)
    single_layout = _state(model, optimizer)
    save_checkpoint(tmp_path / "w1_step2.pth", single_layout)

    try:
        mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    except Exception as exc:  # show the workers' tracebacks, not only the spawn wrapper's
        errs = [p.read_text() for p in sorted(tmp_path.glob("err.*"))]
        raise AssertionError("\n".join(errs) or str(exc)) from exc

    rep, ep = (
        torch.load(tmp_path / f"{m}_log.pt", weights_only=True) for m in ("replicated", "ep")
    )
    # 3 training steps: same losses and (global) gradient norms; clipping was active
    _close(ep["log"], rep["log"], "losses/grad norms")
    assert all(norm > 0.1 for _, norm in rep["log"])
    # ... and the same parameters and AdamW moments, in the single-process layout
    for step in (2, 3):
        a = load_checkpoint(tmp_path / f"ep_step{step}.pth")
        b = load_checkpoint(tmp_path / f"replicated_step{step}.pth")
        _close(a["model"], b["model"], f"model@{step}")
        _close(a["optimizer"], b["optimizer"], f"optimizer@{step}")
        assert list(a["model"]) == list(single_layout["model"])  # keys in single-process order
        names = [g["param_names"] for g in a["optimizer"]["param_groups"]]
        assert names == [g["param_names"] for g in single_layout["optimizer"]["param_groups"]]
        assert len(a["optimizer"]["state"]) == len(single_layout["optimizer"]["state"])
    # W=1 -> W=2: the single-process checkpoint continues identically on both layouts
    _close(ep["resumed"], rep["resumed"], "resumed W=1 -> W=2")

    # W=2 -> W=1: both step-2 checkpoints continue with the same losses on one process
    cont = {}
    for mode in ("replicated", "ep"):
        state = load_checkpoint(tmp_path / f"{mode}_step2.pth")
        model, criterion, optimizer, ddp = _build(cfg, expert_parallel=True)  # 1 process: local
        load_model_state(model, state["model"], path=mode)
        load_optimizer_state(model, optimizer, state["optimizer"], path=mode)
        cont[mode] = _steps(model, ddp, criterion, optimizer, range(2, 4), seed=40)
    _close(cont["ep"], cont["replicated"], "resumed W=2 -> W=1")

    # routing statistics of the uneven 2-rank inference == one process on the same images
    model, *_ = _build(cfg, expert_parallel=False)
    load_model_state(model, load_checkpoint(tmp_path / "ep_step3.pth")["model"], path="ep")
    single = _routing(model, [0, 1, 2]).to_dict()
    assert single["tokens"] == ep["routing"]["tokens"] == rep["routing"]["tokens"]
    for key in ("top1", "assigned", "dropped", "correct"):
        assert single[key] == ep["routing"][key], key
    assert sum(map(sum, single["tokens"])) > 0
