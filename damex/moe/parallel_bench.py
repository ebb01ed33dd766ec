"""Expert parallelism vs replicated experts: per-rank memory and training-step time.

``tools/benchmark.py moe --distributed`` (or ``python -m damex.moe.parallel_bench``) starts
``W`` gloo processes on this machine (CPU, one intra-op thread each) and times one training
step of a ``MoEFFN`` layer, per rank: forward, backward, gradient synchronisation and an AdamW
step, for every ``E``, in two layouts:

- ``replicated``: every rank holds all ``E`` experts; DDP all-reduces every gradient.
- ``expert-parallel``: rank ``r`` holds ``E/W`` experts; tokens travel by all-to-all; DDP
  all-reduces only the router; the expert gradients are scaled by ``1/W``.

Both layouts of one ``E`` are timed in interleaved rounds on the same tokens (the machine is
shared; ratios from one run are what to compare). The memory columns count parameter bytes
held by one rank; gradients add the same again and AdamW twice that.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from damex.moe.layer import MoEFFN
from damex.moe.parallel import ignore_expert_params_in_ddp, scale_expert_grads_

__all__ = ["run_parallel_benchmark", "format_parallel_table", "main"]

_MODES = ("replicated", "expert-parallel")


class _Net(nn.Module):
    def __init__(self, moe: MoEFFN) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor, token_image: torch.Tensor) -> torch.Tensor:
        return self.moe(x, token_image)[0]


def _setup(mode: str, num_experts: int, kw: dict[str, Any]) -> tuple[nn.Module, Any, int]:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    group = dist.group.WORLD if mode == "expert-parallel" else None
    net = _Net(MoEFFN(num_experts=num_experts, expert_parallel_group=group, **kw))
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    if group is not None:
        ignore_expert_params_in_ddp(net)
    ddp = DistributedDataParallel(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    return ddp, opt, param_bytes


def _step(
    ddp: nn.Module, opt: Any, x: torch.Tensor, ti: torch.Tensor, w: torch.Tensor
) -> tuple[float, float]:
    """One training step; returns (total, forward + backward incl. DDP's all-reduce) seconds."""
    t0 = time.perf_counter()
    loss = (ddp(x, ti) * w).sum()
    loss.backward()  # DDP's bucketed all-reduce runs inside
    scale_expert_grads_(ddp.module, 1.0 / dist.get_world_size())  # no-op when replicated
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dist.barrier()  # the step ends when the slowest rank is done
    return time.perf_counter() - t0, t1 - t0


def _rank_main(rank: int, world: int, port: int, args: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        kw = dict(
            d_model=args["d_model"],
            hidden_dim=args["hidden"],
            top_k=1,
            capacity_factor=args["capacity_factor"],
            gate_noise=0.0,
            cpu_threads=False,
        )
        g = torch.Generator().manual_seed(100 + rank)
        tokens = args["tokens"]
        x = torch.randn(tokens, args["d_model"], generator=g)
        ti = torch.arange(tokens) // args["tokens_per_image"]
        w = torch.randn(tokens, args["d_model"], generator=g)
        rows = []
        for num_experts in args["experts"]:
            setups = {m: _setup(m, num_experts, kw) for m in _MODES}
            times: dict[str, list[tuple[float, float]]] = {m: [] for m in _MODES}
            for i in range(args["warmup"] + args["repeats"]):
                for mode in _MODES:  # interleaved rounds
                    ddp, opt, _ = setups[mode]
                    t = _step(ddp, opt, x, ti, w)
                    if i >= args["warmup"]:
                        times[mode].append(t)
            for mode in _MODES:
                rows.append(
                    {
                        "experts": num_experts,
                        "mode": mode,
                        "experts_per_rank": num_experts // world
                        if mode == "expert-parallel"
                        else num_experts,
                        "param_bytes": setups[mode][2],
                        "step_s": statistics.median(t for t, _ in times[mode]),
                        "fwd_bwd_s": statistics.median(t for _, t in times[mode]),
                    }
                )
            del setups
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            torch.save(gathered, out)
    except BaseException:
        Path(f"{out}.err{rank}").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_parallel_benchmark(
    experts: Sequence[int] = (8, 16, 32),
    world_size: int = 2,
    tokens: int = 1800,
    tokens_per_image: int = 900,
    d_model: int = 256,
    hidden: int = 2048,
    capacity_factor: float = 1.25,
    repeats: int = 5,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """Time replicated vs expert-parallel training steps on ``world_size`` gloo processes.

    Args:
        experts: ``E`` values (each a multiple of ``world_size``).
        world_size: processes (one intra-op thread each).
        tokens: tokens per rank per step (``tokens_per_image`` per capacity group).
        d_model: ``d``; hidden: ``h`` per expert (DINO: 256 / 2048).
        capacity_factor: the layer's capacity factor.
        repeats: timed rounds; warmup: untimed rounds first.

    Returns:
        One row per (E, mode): ``experts``, ``mode``, ``experts_per_rank``, ``param_bytes``
        (per rank), ``step_s`` (median over rounds of the slowest rank's step, rank 0's clock)
        and ``step_s_ranks`` (every rank's median).
    """
    bad = [e for e in experts if e % world_size]
    if bad:
        raise ValueError(f"every E must be a multiple of world_size={world_size}, got {bad}")
    args = dict(
        experts=list(experts),
        tokens=tokens,
        tokens_per_image=tokens_per_image,
        d_model=d_model,
        hidden=hidden,
        capacity_factor=capacity_factor,
        repeats=repeats,
        warmup=warmup,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        try:
            mp.spawn(_rank_main, args=(world_size, _free_port(), args, out), nprocs=world_size)
        except Exception as exc:
            errs = [p.read_text() for p in sorted(Path(tmp).glob("rows.pt.err*"))]
            raise RuntimeError("\n".join(errs) or str(exc)) from exc
        per_rank = torch.load(out, weights_only=True)
    rows = per_rank[0]
    for i, row in enumerate(rows):
        row["step_s_ranks"] = [r[i]["step_s"] for r in per_rank]
        row["world_size"] = world_size
    return rows


def format_parallel_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: per-rank parameters and step time, with EP / replicated ratios."""
    world = rows[0]["world_size"] if rows else 0
    lines = [
        "| E | layout | experts / rank | params / rank (MiB) | + grads + AdamW (MiB) | "
        "step (ms) | of which fwd+bwd+sync (ms) | EP / replicated |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    by_e: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_e.setdefault(row["experts"], {})[row["mode"]] = row
    for e, modes in by_e.items():
        rep = modes["replicated"]
        for mode in _MODES:
            row = modes[mode]
            ratio = ""
            if mode == "expert-parallel":
                ratio = (
                    f"memory {row['param_bytes'] / rep['param_bytes']:.2f}x, "
                    f"time {row['step_s'] / rep['step_s']:.2f}x"
                )
            lines.append(
                f"| {e} | {mode} | {row['experts_per_rank']} | "
                f"{row['param_bytes'] / 2**20:.1f} | {4 * row['param_bytes'] / 2**20:.1f} | "
                f"{row['step_s'] * 1e3:.0f} | {row['fwd_bwd_s'] * 1e3:.0f} | {ratio} |"
            )
    lines.append(
        f"\n{world} gloo processes, 1 CPU thread each; one step = forward + backward (DDP's "
        "all-reduce inside) + AdamW on one MoE layer; medians over rounds, rank 0's clock, the "
        "step ending at a barrier. fp32: grads + AdamW moments = 3x the parameter bytes."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1800, help="tokens per rank per step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = p.parse_args(list(argv) if argv is not None else None)
    tokens, repeats = (900, 3) if a.quick else (a.tokens, a.repeats)
    table = format_parallel_table(
        run_parallel_benchmark(
            experts=a.experts, world_size=a.world_size, tokens=tokens, repeats=repeats
        )
    )
    print(table)
    if a.out:
        Path(a.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
