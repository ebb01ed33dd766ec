"""Throughput of ``MoEFFN`` (forward + backward) against the dense FFN of the same hidden size.

All configurations of one token count are timed in interleaved rounds (dense, then every
(E, cf), repeated), so slow drifts of a shared machine hit them alike; the table reports the
median time of each and the ratio of medians to the dense FFN.

Run ``python -m damex.moe.bench`` for the default table. On a shared CPU the numbers swing by
+-10% between runs (OpenMP regions stall when another process holds a core); compare ratios
from one run on an otherwise idle machine. The dense baseline also pays glibc page faults for
its ``[T, h]`` activations (>= ~15 MB buffers are re-mapped on every call), which the MoE's
per-expert buffers mostly avoid; that favours the MoE slightly at large T.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from damex.moe.layer import MoEFFN

__all__ = ["format_moe_table", "run_moe_benchmark"]


def _dense_ffn(d_model: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))


def _bench_configs(
    experts: Sequence[int],
    capacity_factors: Sequence[float],
    *,
    d_model: int,
    hidden: int,
    top_k: int,
    seed: int,
    device: torch.device,
    threaded: bool,
) -> list[tuple[int, float | None, bool | None, nn.Module]]:
    """``(E, cf, cpu_threads, module)`` to time: the dense FFN first, then every MoE layer."""
    configs: list[tuple[int, float | None, bool | None, nn.Module]] = [
        (0, None, None, _dense_ffn(d_model, hidden).to(device))
    ]
    for num_experts in experts:
        if num_experts <= 0:
            continue
        for cf in capacity_factors:
            for thr in (False, True) if threaded else (None,):
                torch.manual_seed(seed + num_experts)  # same weights with and without
                layer = MoEFFN(
                    d_model=d_model,
                    hidden_dim=hidden,
                    num_experts=num_experts,
                    top_k=min(top_k, num_experts),
                    capacity_factor=cf,
                    cpu_threads=thr,
                ).to(device)
                configs.append((num_experts, cf, thr, layer))
    return configs


def _time_rounds(
    configs: list[tuple[int, float | None, bool | None, nn.Module]],
    x: Tensor,
    token_image: Tensor | None,
    grad_out: Tensor,
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
) -> tuple[list[list[float]], dict[int, float]]:
    """Interleaved rounds over ``configs``: per config its timed seconds, and its kept fraction."""
    kept: dict[int, float] = {}
    times: list[list[float]] = [[] for _ in configs]
    for rnd in range(warmup + repeats):
        for i, (_, _, _, module) in enumerate(configs):
            elapsed, kept_fraction = _timed_step(module, x, token_image, grad_out, device)
            kept[i] = kept_fraction
            if rnd >= warmup:
                times[i].append(elapsed)
    return times, kept


def run_moe_benchmark(
    tokens: Sequence[int] = (900, 1800, 3600, 7200),
    experts: Sequence[int] = (0, 2, 4, 8, 16),
    capacity_factors: Sequence[float] = (0.0, 1.25),
    d_model: int = 256,
    hidden: int = 2048,
    repeats: int = 5,
    top_k: int = 1,
    tokens_per_image: int | None = 900,
    warmup: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    threaded: bool = False,
) -> list[dict[str, Any]]:
    """Time forward + backward of the dense FFN (``E = 0``) and ``MoEFFN`` configurations.

    Args:
        tokens: token counts ``T`` per call.
        experts: expert counts; 0 = the dense FFN baseline (always timed, listed once per T).
        capacity_factors: factors to time for each ``E > 0``.
        d_model: ``d``.
        hidden: ``h`` (dense and per expert).
        repeats: timed rounds.
        top_k: ``k``.
        tokens_per_image: capacity groups of this many tokens (``"image"`` grouping, the
            official setting with 900 queries); None = one group.
        warmup: untimed rounds first.
        seed: RNG seed for weights and inputs.
        device: where to run.
        threaded: time every MoE configuration both with the CPU expert threading forced on
            and off (``cpu_threads=True`` / ``False``, see :mod:`damex.moe.experts`),
            interleaved; otherwise the layer's automatic choice.

    Returns:
        One dict per (T, E, cf[, threaded]): ``tokens, experts, capacity_factor (None for
        dense), top_k, threaded, seconds (median), tokens_per_s, ratio_to_dense,
        kept_fraction``.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for num_tokens in tokens:
        torch.manual_seed(seed)
        x = torch.randn(num_tokens, d_model, generator=gen).to(device).requires_grad_()
        grad_out = torch.randn(num_tokens, d_model, generator=gen).to(device)
        token_image = None
        if tokens_per_image:
            token_image = (torch.arange(num_tokens) // tokens_per_image).to(device)
        configs = _bench_configs(
            experts,
            capacity_factors,
            d_model=d_model,
            hidden=hidden,
            top_k=top_k,
            seed=seed,
            device=device,
            threaded=threaded,
        )
        times, kept = _time_rounds(
            configs, x, token_image, grad_out, device, warmup=warmup, repeats=repeats
        )
        dense_s = statistics.median(times[0])
        for i, (num_experts, cf, thr, _) in enumerate(configs):
            seconds = statistics.median(times[i])
            rows.append(
                {
                    "tokens": num_tokens,
                    "experts": num_experts,
                    "capacity_factor": cf,
                    "top_k": 0 if num_experts == 0 else min(top_k, num_experts),
                    "threaded": thr,
                    "seconds": seconds,
                    "tokens_per_s": num_tokens / seconds,
                    "ratio_to_dense": dense_s / seconds,
                    "kept_fraction": kept.get(i, 1.0),
                }
            )
    return rows


def _timed_step(
    module: nn.Module,
    x: Tensor,
    token_image: Tensor | None,
    grad_out: Tensor,
    device: torch.device,
) -> tuple[float, float]:
    """One forward + backward; returns (seconds, kept fraction)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    kept = 1.0
    if isinstance(module, MoEFFN):
        y, info = module(x, token_image)
    else:
        y, info = module(x), None
    y.backward(grad_out)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if info is not None:
        kept = float(info.kept.float().mean())
    return elapsed, kept


def format_moe_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_moe_benchmark` rows."""
    lines = [
        "| T | E | cf | k | ms (fwd+bwd) | tokens/s | x dense | kept |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = "dense" if r["experts"] == 0 else str(r["experts"])
        if r.get("threaded") is not None and r["experts"]:
            name += " (threaded)" if r["threaded"] else " (unthreaded)"
        cf = "-" if r["capacity_factor"] is None else f"{r['capacity_factor']:g}"
        k = "-" if r["experts"] == 0 else str(r["top_k"])
        lines.append(
            f"| {r['tokens']} | {name} | {cf} | {k} | {1e3 * r['seconds']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['ratio_to_dense']:.2f} | "
            f"{100 * r['kept_fraction']:.1f}% |"
        )
    return "\n".join(lines)


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="900,1800,3600,7200")
    parser.add_argument("--experts", default="0,2,4,8,16")
    parser.add_argument("--capacity-factors", default="0,1.25")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threaded", action="store_true", help="time the CPU expert threading on and off"
    )
    args = parser.parse_args(argv)
    rows = run_moe_benchmark(
        tokens=_parse_ints(args.tokens),
        experts=_parse_ints(args.experts),
        capacity_factors=tuple(float(v) for v in args.capacity_factors.split(",")),
        d_model=args.d_model,
        hidden=args.hidden,
        repeats=args.repeats,
        top_k=args.top_k,
        device=args.device,
        threaded=args.threaded,
    )
    print(format_moe_table(rows))  # CLI output


if __name__ == "__main__":
    main()
