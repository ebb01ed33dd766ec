"""Where the time of a training step goes: ``python tools/benchmark.py profile -c CONFIG``.

Runs a few real training iterations of a config (its data loader, model, criterion, AdamW,
gradient clipping) and splits every step into sections, timed with ``time.perf_counter``:

- ``data``: waiting for the next batch and moving it to the device;
- forward, from forward pre/post hooks on the model's parts: ``backbone`` (+ neck),
  ``encoder`` with its deformable attention split out (``encoder: deform attn``),
  ``query selection`` (the transformer outside encoder and decoder: embeddings, two-stage
  top-Q), ``decoder`` with its MoE blocks (``decoder: MoE``) and deformable cross-attention
  (``decoder: deform attn``) split out, ``dense head`` and ``forward, other`` (normalization,
  denoising queries);
- ``matcher`` (hooks on the criterion's Hungarian matcher) and ``criterion`` (the rest);
- ``backward``; ``optimizer`` (gradient clipping, AdamW step, ``zero_grad``).

Peak resident memory is the process's ``ru_maxrss`` after the steps (``resource.getrusage``),
so it includes the model and optimizer state; on CUDA the peak allocated memory is reported too.
Each section's hooks synchronize CUDA when the model runs there, so GPU numbers are exact but a
little slower than an unprofiled step.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from damex.config import load_config
from damex.data.loader import build_train_loader
from damex.engine.distributed import init_distributed
from damex.engine.optim import build_optimizer
from damex.engine.run_data import build_model_parts, build_run_data
from damex.errors import ConfigError
from damex.modeling.deform_attn import MSDeformAttn
from damex.modeling.transformer import MoEBlock

__all__ = ["StepProfile", "format_profile", "main", "profile_training_step"]

# Report order. Exclusive times: a parent section excludes the sections split out of it.
SECTIONS = (
    "data",
    "backbone",
    "encoder",
    "encoder: deform attn",
    "query selection",
    "decoder",
    "decoder: deform attn",
    "decoder: MoE",
    "dense head",
    "forward, other",
    "matcher",
    "criterion",
    "backward",
    "optimizer",
)


@dataclass
class StepProfile:
    """Median milliseconds per section over the timed steps.

    Attributes:
        name: config label.
        image: ``HxW`` of the last batch (padded).
        batch_size: images per step.
        steps: timed steps.
        section_ms: section -> median ms (the sections of :data:`SECTIONS`).
        step_ms: median ms of a whole step (data to optimizer).
        peak_rss_mib: the process's peak resident memory after the steps.
        cuda_peak_mib: peak CUDA memory allocated, or None on CPU.
        threads: intra-op threads.
    """

    name: str
    image: str
    batch_size: int
    steps: int
    section_ms: dict[str, float]
    step_ms: float
    peak_rss_mib: float
    cuda_peak_mib: float | None = None
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class _SectionTimer:
    """Accumulates seconds per section from forward pre/post hooks (no state left on modules)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self._open: dict[int, list[float]] = {}
        self._handles: list[RemovableHandle] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def watch(self, module: nn.Module, name: str) -> None:
        key = id(module)
        hooks = _Hooks(self, key, name)
        self._handles.append(module.register_forward_pre_hook(hooks.pre))
        self._handles.append(module.register_forward_hook(hooks.post))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


@dataclass
class _Hooks:
    timer: _SectionTimer
    key: int
    name: str

    def pre(self, module: nn.Module, args: Any) -> None:
        self.timer._sync()
        self.timer._open.setdefault(self.key, []).append(time.perf_counter())

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.timer._sync()
        start = self.timer._open[self.key].pop()
        self.timer.add(self.name, time.perf_counter() - start)


def _watch_model(timer: _SectionTimer, model: nn.Module, criterion: nn.Module) -> None:
    timer.watch(model, "_model")
    timer.watch(model.backbone, "_backbone")
    timer.watch(model.neck, "_neck")
    tr = model.transformer
    timer.watch(tr, "_transformer")
    timer.watch(tr.encoder, "_encoder")
    timer.watch(tr.decoder, "_decoder")
    for m in tr.encoder.modules():
        if isinstance(m, MSDeformAttn):
            timer.watch(m, "_enc_deform")
    for m in tr.decoder.modules():
        if isinstance(m, MSDeformAttn):
            timer.watch(m, "_dec_deform")
        elif isinstance(m, MoEBlock):
            timer.watch(m, "_moe")
    if getattr(model, "dense_head", None) is not None:
        timer.watch(model.dense_head, "_dense_head")
    timer.watch(criterion, "_criterion")
    timer.watch(criterion.matcher, "_matcher")


def _exclusive(raw: dict[str, float]) -> dict[str, float]:
    """Hook totals (inclusive, seconds) -> exclusive sections (seconds)."""
    g = raw.get
    enc, dec, tr = g("_encoder", 0.0), g("_decoder", 0.0), g("_transformer", 0.0)
    backbone = g("_backbone", 0.0) + g("_neck", 0.0)
    out = {
        "backbone": backbone,
        "encoder: deform attn": g("_enc_deform", 0.0),
        "encoder": enc - g("_enc_deform", 0.0),
        "decoder: deform attn": g("_dec_deform", 0.0),
        "decoder: MoE": g("_moe", 0.0),
        "decoder": dec - g("_dec_deform", 0.0) - g("_moe", 0.0),
        "query selection": tr - enc - dec,
        "dense head": g("_dense_head", 0.0),
        "forward, other": g("_model", 0.0) - backbone - tr - g("_dense_head", 0.0),
        "matcher": g("_matcher", 0.0),
        "criterion": g("_criterion", 0.0) - g("_matcher", 0.0),
    }
    return out


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1.0 / (1 << 20) if sys.platform == "darwin" else 1.0 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _batches(loader: Any, sampler: Any) -> Iterator[Any]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class _Runner:
    """One config's loader, model, criterion and optimizer, stepped on demand."""

    def __init__(self, config: str | None, overrides: Sequence[str]) -> None:
        cfg = load_config(config, list(overrides))
        self.cfg = cfg
        self.device = init_distributed(cfg.train.device).device
        torch.manual_seed(cfg.train.seed)
        data = build_run_data(cfg)
        loader, sampler, _ = build_train_loader(
            cfg, data.catalog, data.label_space, data.expert_of_dataset
        )
        num_classes = data.label_space.num_classes
        self.label_names = tuple(data.label_space.names)
        model, criterion, _ = build_model_parts(cfg, num_classes)  # as the trainer builds them
        self.model = model.to(self.device)
        self.criterion = criterion.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.max_norm = cfg.train.clip_max_norm if cfg.train.clip_max_norm > 0 else math.inf
        self.model.train()
        self.criterion.train()
        self.timer = _SectionTimer(self.device)
        _watch_model(self.timer, self.model, self.criterion)
        self.batches = _batches(loader, sampler)
        self.image = ""

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def next_batch(self) -> Any:
        return next(self.batches)

    def step(self, batch: Any = None) -> tuple[dict[str, float], float]:
        """One training step on ``batch`` (default: this config's next one): (exclusive
        seconds per section, total seconds)."""
        self._sync()
        t0 = time.perf_counter()
        batch = (self.next_batch() if batch is None else batch).to(self.device)
        self._sync()
        t1 = time.perf_counter()
        losses = self.criterion(self.model(batch), batch)
        loss: Tensor = losses["loss"]
        self._sync()
        t2 = time.perf_counter()
        loss.backward()
        self._sync()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        t4 = time.perf_counter()
        sections = _exclusive(self.timer.pop())
        sections["data"] = t1 - t0
        sections["backward"] = t3 - t2
        sections["optimizer"] = t4 - t3
        # anything between the hooks (e.g. the loss dict) counts as criterion
        sections["criterion"] += (t2 - t1) - sum(
            v for k, v in sections.items() if k not in ("data", "backward", "optimizer")
        )
        self.image = "x".join(str(s) for s in batch.images.shape[-2:])
        return sections, t4 - t0

    def close(self) -> None:
        self.timer.remove()


def _image_overrides(image_size: int | None) -> list[str]:
    if image_size is None:
        return []
    long_side = round(image_size * 1333 / 800)
    return [f"data.scales=[{image_size}]", f"data.max_size={long_side}", "data.crop=false"]


def profile_training_steps(
    configs: Sequence[tuple[str, str | None, Sequence[str]]],
    *,
    steps: int = 5,
    warmup: int = 2,
    image_size: int | None = None,
    same_batches: bool = False,
) -> list[StepProfile]:
    """Profile ``warmup + steps`` real training iterations of each config, interleaved.

    The configs take turns step by step (config A step 1, config B step 1, ...), so the drifts
    of a shared machine hit them alike; compare them within one call.

    Args:
        configs: ``(label, YAML path or None for the default, overrides)`` per config.
        steps: timed steps (medians are reported).
        warmup: untimed steps first.
        image_size: if set, train at this short side only (``data.scales=[S]``, long side
            ``max_size = round(S * 1333 / 800)``, no crop).
        same_batches: every config steps on the first config's batches (the same images and
            sizes, all drawn before the first timed step, so ``data`` is ~0), so that the
            per-step times compare the models alone; the configs must share their label space.
            Otherwise each config draws from its own loader, whose random scales differ
            between configs.

    Returns:
        One :class:`StepProfile` per config, in order.
    """
    extra = _image_overrides(image_size)
    runners = [_Runner(path, [*over, *extra]) for _, path, over in configs]
    if same_batches:
        for (label, _, _), r in zip(configs[1:], runners[1:]):
            if r.label_names != runners[0].label_names:
                raise ConfigError(
                    f"same_batches: {label} has another label space than {configs[0][0]} "
                    f"({len(r.label_names)} vs {len(runners[0].label_names)} classes)"
                )
    per_step: list[list[dict[str, float]]] = [[] for _ in runners]
    totals: list[list[float]] = [[] for _ in runners]
    for r in runners:
        if r.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(r.device)
    try:
        # shared batches are drawn before any step is timed: the loader's worker process
        # prefetches while the consumer runs, which would slow whichever config drew them
        shared = [runners[0].next_batch() for _ in range(warmup + steps)] if same_batches else []
        for i in range(warmup + steps):
            for j, r in enumerate(runners):
                sections, total = r.step(shared[i] if same_batches else None)
                if i >= warmup:
                    per_step[j].append(sections)
                    totals[j].append(total)
    finally:
        for r in runners:
            r.close()
    out = []
    for (label, _, _), r, secs, tot in zip(configs, runners, per_step, totals):
        med = {s: 1e3 * statistics.median(d.get(s, 0.0) for d in secs) for s in SECTIONS}
        cuda_peak = None
        if r.device.type == "cuda":
            cuda_peak = torch.cuda.max_memory_allocated(r.device) / (1 << 20)
        out.append(
            StepProfile(
                name=label,
                image=r.image,
                batch_size=r.cfg.train.batch_size,
                steps=steps,
                section_ms=med,
                step_ms=1e3 * statistics.median(tot),
                peak_rss_mib=_peak_rss_mib(),
                cuda_peak_mib=cuda_peak,
                threads=torch.get_num_threads(),
            )
        )
    return out


def profile_training_step(
    config: str | None,
    overrides: Sequence[str] = (),
    *,
    steps: int = 5,
    warmup: int = 2,
    image_size: int | None = None,
    name: str | None = None,
) -> StepProfile:
    """:func:`profile_training_steps` of one config (label: ``name`` or the file name)."""
    label = name or (str(config) if config else "default")
    return profile_training_steps(
        [(label, config, overrides)], steps=steps, warmup=warmup, image_size=image_size
    )[0]


def format_profile(p: StepProfile) -> str:
    """A Markdown table of one profile: section, ms, % of the step (medians per section)."""
    return format_profiles([p])


def format_profiles(profiles: Sequence[StepProfile]) -> str:
    """Markdown table, one ``ms`` / ``%`` column pair per profile (medians per section; the
    rows of a column need not sum exactly to the median step)."""
    head = ", ".join(f"{p.name}: {p.image} x{p.batch_size}" for p in profiles)
    p0 = profiles[0]
    lines = [
        f"{head}; median of {p0.steps} steps, {p0.threads} threads",
        "",
        "| section | " + " | ".join(f"{p.name} ms | %" for p in profiles) + " |",
        "|---|" + "---:|---:|" * len(profiles),
    ]
    for s in SECTIONS:
        cells = [
            f"{p.section_ms[s]:.1f} | {100 * p.section_ms[s] / p.step_ms:.1f}%" for p in profiles
        ]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append(
        "| **step** | " + " | ".join(f"**{p.step_ms:.1f}** | 100%" for p in profiles) + " |"
    )
    if len(profiles) > 1:
        cells = [f"{p0.step_ms / p.step_ms:.3f} | " for p in profiles]
        lines.append(f"| it/s relative to {p0.name} | " + " | ".join(cells) + " |")
    lines.append("")
    for p in profiles:
        mem = f"{p.name}: peak RSS {p.peak_rss_mib / 1024:.2f} GiB"
        if p.cuda_peak_mib is not None:
            mem += f", peak CUDA allocated {p.cuda_peak_mib / 1024:.2f} GiB"
        lines.append(mem)
    if len(profiles) > 1:
        lines.append("(one process: the peak RSS covers every config profiled so far)")
    return "\n".join(lines)


def top_ops(config: str | None, overrides: Sequence[str], *, rows: int, warmup: int = 2) -> str:
    """``torch.profiler`` table of the top ops (self CPU time) of one training step."""
    from torch.profiler import ProfilerActivity, profile

    runner = _Runner(config, overrides)
    for _ in range(warmup):
        runner.step()
    activities = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        runner.step()
    runner.close()
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv: Sequence[str] | None = None) -> int:
    import shlex

    parser = argparse.ArgumentParser(
        prog="benchmark profile", description="time the sections of a few training steps"
    )
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=None,
        help="YAML config, optionally followed by its own overrides in one quoted argument "
        "('PATH key=value ...'); repeat to profile several configs side by side (interleaved)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="short side (px)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ops", type=int, default=0, help="also print the top N ops (profiler)")
    parser.add_argument(
        "--same-batches",
        action="store_true",
        help="step every config on the first config's batches (compare the models alone; "
        "the configs must share their label space)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every config")
    args = parser.parse_args(argv)
    configs: list[tuple[str, str | None, list[str]]] = []
    for spec in args.config or [""]:
        words = shlex.split(spec)
        path = words[0] if words else None
        label = Path(path).stem if path else "default"
        if len(words) > 1:
            label += " (" + " ".join(words[1:]) + ")"
        configs.append((label, path, [*words[1:], *args.overrides]))
    profiles = profile_training_steps(
        configs,
        steps=args.steps,
        warmup=args.warmup,
        image_size=args.image_size,
        same_batches=args.same_batches,
    )
    print(format_profiles(profiles))  # CLI output
    if args.ops:
        for label, path, over in configs:
            print(f"\n{label}: top {args.ops} ops by self time, one step")  # CLI output
            print(top_ops(path, [*over, *_image_overrides(args.image_size)], rows=args.ops))
    return 0
