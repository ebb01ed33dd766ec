"""Inference throughput: ``tools/benchmark.py infer -c CONFIG [--image-size S] [--compile]``.

Builds the config's detector (random init: the speed does not depend on the weights), runs the
eval-mode forward and the post-processing under ``torch.inference_mode`` on batches of random
images of the config's test size, and reports images/s. With ``--compile`` the same model is
then wrapped in ``torch.compile`` and timed after the eager rounds (the compile time itself is
reported separately). Loading is not timed here (``run_inference`` overlaps it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from damex.config import load_config
from damex.engine.distributed import init_distributed
from damex.engine.run_data import build_run_data
from damex.modeling import build_model
from damex.modeling.bench import _batch
from damex.modeling.postprocess import build_postprocess

__all__ = ["main", "run_infer_benchmark"]


def _timed(model: nn.Module, postprocess: Any, batch: Any, inference: bool = True) -> float:
    start = time.perf_counter()
    with torch.inference_mode() if inference else torch.no_grad():
        out = model(batch)
        postprocess(out.pred, batch.orig_sizes)
    if batch.images.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _median_time(
    model: nn.Module, postprocess: Any, batch: Any, warmup: int, repeats: int, inference: bool
) -> float:
    times = [_timed(model, postprocess, batch, inference) for _ in range(warmup + repeats)]
    return statistics.median(times[warmup:])


def run_infer_benchmark(
    config: str | None,
    overrides: Sequence[str] = (),
    *,
    image_size: int | None = None,
    batch_size: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    compile: bool = False,
) -> dict[str, Any]:
    """Images/s of the eval forward + post-processing, eager (and compiled).

    Args:
        config: YAML path (None = the default config).
        overrides: ``key=value`` config overrides.
        image_size: short side (default: the config's test scale); 4:3 images.
        batch_size: images per forward.
        repeats: timed rounds (median reported).
        warmup: untimed rounds first (the first compiled call compiles).
        compile: also time ``torch.compile(model)``.

    Returns:
        ``image, batch, eager_img_s`` and, with ``compile``, ``compiled_img_s``,
        ``compile_s`` (the first call) or ``compile_error``.
    """
    cfg = load_config(config, list(overrides))
    device = init_distributed(cfg.train.device).device
    num_classes = build_run_data(cfg).label_space.num_classes
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.moe, num_classes).to(device).eval()
    postprocess = build_postprocess(cfg)
    short = image_size or cfg.data.test_scale or max(cfg.data.scales)
    height, width = short, round(short * 4 / 3)
    batch = _batch(batch_size, height, width, num_classes, 0).to(device)
    result: dict[str, Any] = {"image": f"{height}x{width}", "batch": batch_size}
    eager = _median_time(model, postprocess, batch, warmup, repeats, inference=True)
    result["eager_img_s"] = batch_size / eager
    if compile:
        # after the eager rounds, not interleaved: calling the eager module after its compiled
        # wrapper hit an internal PyTorch assert here (PythonDispatcherTLS, torch 2.14 CPU);
        # under no_grad: inductor failed on inference tensors ("Cannot set version_counter")
        try:
            compiled = torch.compile(model)
            start = time.perf_counter()
            _timed(compiled, postprocess, batch, inference=False)
            result["compile_s"] = time.perf_counter() - start
            seconds = _median_time(compiled, postprocess, batch, warmup, repeats, inference=False)
            result["compiled_img_s"] = batch_size / seconds
        except Exception as e:  # noqa: BLE001 - reported, the eager numbers still count
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            result["compile_error"] = f"{type(e).__name__}: {' '.join(lines[:3])[:300]}"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark infer", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    r = run_infer_benchmark(
        args.config,
        args.overrides,
        image_size=args.image_size,
        batch_size=args.batch_size,
        repeats=args.repeats,
        compile=args.compile,
    )
    line = f"| {args.config or 'default'} | {r['image']} | {r['batch']} | {r['eager_img_s']:.2f} |"
    if "compiled_img_s" in r:
        line += f" {r['compiled_img_s']:.2f} | {r['compile_s']:.0f} s |"
    elif "compile_error" in r:
        line += f" failed: {r['compile_error']} | - |"
    print("| config | image | batch | eager img/s | compiled img/s | compile time |")  # CLI
    print("|---|---|---:|---:|---:|---:|")  # CLI output
    print(line)  # CLI output
    return 0
