"""Speed of the whole detector: forward (eval) and forward + backward (train) seconds per image.

Configurations (``MODEL_BENCH_CONFIGS``):

- ``small``: ResNet-18, d=128, 2 encoder / 3 decoder layers, 100 queries, 320 px short side;
  the scale of the quick from-scratch CPU runs.
- ``r50-4scale-512`` / ``r50-4scale-800``: DINO-4scale R50 as in the paper (d=256, 6 + 6 layers,
  FFN 2048, 900 queries, 100 DN queries), 512 / 800 px short side, 4:3 images.
- ``*-moe`` variants (``moe=True``): decoder layers 0, 2, 4 as MoE with 8 experts, top-1,
  capacity 1.25 per image (the DAMEX setting).

Forward is timed in eval mode under ``no_grad``; forward + backward in train mode (denoising on,
two GT boxes per image) with the backward of a proxy loss (sum of every prediction), so the
numbers do not depend on the criterion. The median over ``repeats`` timed rounds is reported.

Run ``python -m damex.modeling.bench`` (``--quick`` for the small config only).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from damex.config import BackboneConfig, DNConfig, ModelConfig, MoEConfig
from damex.modeling.build import build_model
from damex.modeling.deform_attn import MSDeformAttn
from damex.modeling.outputs import DetectorOutput
from damex.structures import Batch, Target

__all__ = ["MODEL_BENCH_CONFIGS", "ModelBenchConfig", "run_model_benchmark", "format_model_table"]


@dataclass(frozen=True)
class ModelBenchConfig:
    """One benchmarked model and input size."""

    backbone: str
    d_model: int
    nheads: int
    enc_layers: int
    dec_layers: int
    dim_feedforward: int
    num_queries: int
    dn_number: int
    short_side: int
    decoder_ffn: tuple[str, ...] = field(default_factory=tuple)  # empty = all dense


_SMALL = ModelBenchConfig("resnet18", 128, 4, 2, 3, 512, 100, 20, 320)
_R50 = dict(
    backbone="resnet50",
    d_model=256,
    nheads=8,
    enc_layers=6,
    dec_layers=6,
    dim_feedforward=2048,
    num_queries=900,
    dn_number=100,
)
_MOE6 = ("moe", "dense", "moe", "dense", "moe", "dense")

MODEL_BENCH_CONFIGS: dict[str, ModelBenchConfig] = {
    "small": _SMALL,
    "r50-4scale-512": ModelBenchConfig(**_R50, short_side=512),
    "r50-4scale-800": ModelBenchConfig(**_R50, short_side=800),
    "small-moe": ModelBenchConfig(**{**_SMALL.__dict__, "decoder_ffn": ("moe", "dense", "moe")}),
    "r50-4scale-512-moe": ModelBenchConfig(**_R50, short_side=512, decoder_ffn=_MOE6),
    "r50-4scale-800-moe": ModelBenchConfig(**_R50, short_side=800, decoder_ffn=_MOE6),
}


def _model_cfg(c: ModelBenchConfig) -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(name=c.backbone),
        d_model=c.d_model,
        nheads=c.nheads,
        enc_layers=c.enc_layers,
        dec_layers=c.dec_layers,
        dim_feedforward=c.dim_feedforward,
        num_queries=c.num_queries,
        decoder_ffn=list(c.decoder_ffn) or ["dense"] * c.dec_layers,
        dn=DNConfig(number=c.dn_number),
    )


def _batch(batch_size: int, height: int, width: int, num_classes: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, height, width, generator=g) * 255
    targets = [
        Target(
            torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.7, 0.4, 0.2]]),
            torch.randint(0, num_classes, (2,), generator=g),
        )
        for _ in range(batch_size)
    ]
    hw = torch.tensor([[height, width]] * batch_size)
    zeros = torch.zeros(batch_size, dtype=torch.long)
    return Batch(
        images=images,
        mask=torch.zeros(batch_size, height, width, dtype=torch.bool),
        targets=targets,
        dataset_ids=zeros,
        expert_ids=zeros,
        image_ids=torch.arange(batch_size),
        image_sizes=hw,
        orig_sizes=hw,
    )


def _proxy_loss(out: DetectorOutput) -> Tensor:
    preds = [out.pred, *out.aux, *out.dn, *out.one_to_many]
    if out.interm is not None:
        preds.append(out.interm)
    total = sum(p.logits.float().sum() + p.boxes.float().sum() for p in preds)
    return total + sum(r.logits.float().sum() for r in out.routing)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_model_benchmark(
    configs: Sequence[str] | None = None,
    quick: bool = False,
    moe: bool = False,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    num_classes: int = 20,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Time forward and forward + backward of the configured detectors.

    Args:
        configs: names from ``MODEL_BENCH_CONFIGS``; None = ``small`` + both R50 sizes
            (``quick``: ``small`` only), plus their ``-moe`` variants when ``moe``.
        quick: only the small config (a few seconds).
        moe: add the MoE variants of the selected configs.
        batch_size: images per step.
        repeats: timed rounds (median reported).
        warmup: untimed rounds first.
        num_classes: K.
        seed: weights / inputs seed.
        device: where to run.

    Returns:
        One dict per config: ``name, backbone, image (HxW), batch, queries, decoder_ffn,
        params_m, fwd_s_per_img, fwd_bwd_s_per_img, device, threads``.
    """
    if configs is None:
        configs = ["small"] if quick else ["small", "r50-4scale-512", "r50-4scale-800"]
        if moe:
            configs = [n for c in configs for n in (c, f"{c}-moe")]
    unknown = [c for c in configs if c not in MODEL_BENCH_CONFIGS]
    if unknown:
        raise ValueError(f"unknown benchmark configs {unknown}; known: {list(MODEL_BENCH_CONFIGS)}")
    dev = torch.device(device)
    rows: list[dict[str, Any]] = []
    for name in configs:
        c = MODEL_BENCH_CONFIGS[name]
        torch.manual_seed(seed)
        moe_cfg = MoEConfig(num_experts=8, capacity_factor=1.25, capacity_group="image")
        model = build_model(_model_cfg(c), moe_cfg, num_classes).to(dev)
        height, width = c.short_side, round(c.short_side * 4 / 3)
        batch = _batch(batch_size, height, width, num_classes, seed).to(dev)
        fwd, fwd_bwd = [], []
        for i in range(warmup + repeats):
            model.eval()
            _sync(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                model(batch)
            _sync(dev)
            t1 = time.perf_counter()
            model.train()
            model.zero_grad(set_to_none=True)
            _proxy_loss(model(batch)).backward()
            _sync(dev)
            t2 = time.perf_counter()
            if i >= warmup:
                fwd.append(t1 - t0)
                fwd_bwd.append(t2 - t1)
        rows.append(
            {
                "name": name,
                "backbone": c.backbone,
                "image": f"{height}x{width}",
                "batch": batch_size,
                "queries": c.num_queries,
                "decoder_ffn": ",".join(c.decoder_ffn) or "dense",
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "fwd_s_per_img": statistics.median(fwd) / batch_size,
                "fwd_bwd_s_per_img": statistics.median(fwd_bwd) / batch_size,
                "device": str(dev),
                "threads": torch.get_num_threads(),
            }
        )
        del model
    return rows


def format_model_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of ``run_model_benchmark`` rows."""
    header = (
        "| config | backbone | image | batch | queries | params (M) | forward s/img | "
        "fwd+bwd s/img | device (threads) |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['backbone']} | {r['image']} | {r['batch']} | {r['queries']} | "
            f"{r['params_m']:.1f} | {r['fwd_s_per_img']:.3f} | {r['fwd_bwd_s_per_img']:.3f} | "
            f"{r['device']} ({r['threads']}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=None, choices=list(MODEL_BENCH_CONFIGS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--moe", action="store_true")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    rows = run_model_benchmark(
        configs=args.configs,
        quick=args.quick,
        moe=args.moe,
        batch_size=args.batch_size,
        repeats=args.repeats,
        device=args.device,
    )
    print(format_model_table(rows))  # CLI output


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- deformable attention
DEFORM_SIZES: tuple[tuple[int, int], ...] = ((320, 320), (512, 512), (800, 1333))


def _deform_layer_inputs(
    height: int, width: int, d_model: int, n_levels: int, seed: int
) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Encoder self-attention inputs: one query per location of strides 8, 16, 32, 64."""
    shapes = [(-(-height // s), -(-width // s)) for s in (8, 16, 32, 64)[:n_levels]]
    num = sum(h * w for h, w in shapes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, num, d_model, generator=g)
    ref = torch.rand(1, num, n_levels, 2, generator=g)
    return x, ref, shapes


def _deform_step(layer: torch.nn.Module, x: Tensor, ref: Tensor, shapes: list) -> float:
    inp = x.clone().requires_grad_(True)
    start = time.perf_counter()
    out = layer(inp, ref, inp, shapes)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _deform_peak_rss(impl: str, height: int, width: int, seed: int, queue: Any) -> None:
    """Child process: peak RSS growth (MiB) of one forward + backward (Linux: the peak is
    reset through ``/proc/self/clear_refs`` just before the step)."""
    torch.manual_seed(seed)
    layer = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4, impl=impl)
    x, ref, shapes = _deform_layer_inputs(height, width, 256, 4, seed)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _proc_status_kib("VmRSS")
    except OSError:
        queue.put(float("nan"))
        return
    _deform_step(layer, x, ref, shapes)
    queue.put((_proc_status_kib("VmHWM") - before) / 1024)


def run_deform_benchmark(
    sizes: Sequence[tuple[int, int]] = DEFORM_SIZES,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    memory: bool = True,
) -> list[dict[str, Any]]:
    """Forward + backward of one encoder ``MSDeformAttn`` (d=256, 8 heads, 4 levels, 4 points).

    Both implementations run on the same inputs, interleaved (reference, sparse, reference, ...),
    median of ``repeats``; the peak RSS growth of one step is measured in a fresh process per
    implementation and size (``memory``).

    Returns:
        One dict per size: ``size, queries, ref_ms, sparse_ms, speedup, ref_mib, sparse_mib``.
    """
    import multiprocessing as mp

    rows = []
    for height, width in sizes:
        torch.manual_seed(seed)
        ref_layer = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4, impl="grid_sample")
        fast_layer = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4, impl="sparse")
        fast_layer.load_state_dict(ref_layer.state_dict())
        x, ref, shapes = _deform_layer_inputs(height, width, 256, 4, seed)
        times: dict[str, list[float]] = {"grid_sample": [], "sparse": []}
        for i in range(warmup + repeats):
            for name, layer in (("grid_sample", ref_layer), ("sparse", fast_layer)):
                elapsed = _deform_step(layer, x, ref, shapes)
                if i >= warmup:
                    times[name].append(elapsed)
        row: dict[str, Any] = {
            "size": f"{height}x{width}",
            "queries": x.shape[1],
            "ref_ms": 1e3 * statistics.median(times["grid_sample"]),
            "sparse_ms": 1e3 * statistics.median(times["sparse"]),
        }
        row["speedup"] = row["ref_ms"] / row["sparse_ms"]
        if memory:
            ctx = mp.get_context("spawn")
            for name in ("grid_sample", "sparse"):
                queue = ctx.Queue()
                proc = ctx.Process(target=_deform_peak_rss, args=(name, height, width, seed, queue))
                proc.start()
                row[f"{'ref' if name == 'grid_sample' else 'sparse'}_mib"] = queue.get()
                proc.join()
        rows.append(row)
    return rows


def format_deform_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_deform_benchmark` rows."""
    lines = [
        "| size | queries | grid_sample ms | sparse ms | speedup | grid_sample peak MiB | "
        "sparse peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = [f"{r[k]:.0f}" if k in r else "-" for k in ("ref_mib", "sparse_mib")]
        lines.append(
            f"| {r['size']} | {r['queries']} | {r['ref_ms']:.1f} | {r['sparse_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {mem[0]} | {mem[1]} |"
        )
    return "\n".join(lines)


def deform_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmark deform", description="deformable attention: grid_sample vs sparse"
    )
    parser.add_argument("--sizes", default="320x320,512x512,800x1333")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:  # one size at a time: partial tables survive an interrupted run
        rows += run_deform_benchmark([size], repeats=args.repeats, memory=not args.no_memory)
        print(format_deform_table(rows), flush=True)  # CLI output
    return 0
