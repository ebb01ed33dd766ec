"""The training loop: ``train(cfg, resume)`` and ``evaluate(cfg, checkpoint)``.

One process per device under ``torchrun`` (DDP when ``WORLD_SIZE > 1``; NCCL on CUDA, gloo on
CPU) or a single process. Per optimizer step: ``train.grad_accum`` micro-batches (forward under
optional bf16 / fp16 autocast, loss outside autocast, backward; DDP gradient sync on the last
micro-batch only), gradient clipping at ``train.clip_max_norm``, AdamW step, per-step lr
schedule, optional EMA update.

Non-finite losses: a step whose loss (on any rank) or gradient norm is NaN/inf is skipped (no
parameter update) and counted; ``train.max_nonfinite`` consecutive skipped steps stop the run
with a ``TrainingError`` and the last checkpoint written before is kept untouched.

Checkpoints (``damex.engine.checkpoint``): ``last.pth`` at the end of every epoch, when the run
stops early (``max_iters``, ``time_budget_min``, SIGTERM / SIGINT) and at the end; ``best.pth``
(weights only) when the mean AP over the evaluation datasets improves; ``epoch_XXXX.pth`` every
``train.checkpoint_every`` epochs. A checkpoint holds everything an exact resume needs: model,
optimizer, scheduler, GradScaler, EMA, the sampler position (mid-epoch), the torch / numpy /
python RNG states of every rank, the iteration counters, the elapsed training time (the
``time_cosine`` schedule is a function of it) and the logging window.

Evaluation: every ``train.eval_every`` epochs and at the end, on every evaluation dataset
(``run_inference``); the per-dataset AP table is logged, ``metrics.jsonl`` gets an ``eval``
record, the best mean AP and, separately, every dataset's best AP are tracked (spec Q11: the
official code compared APs of different datasets with one holder).

The final evaluation's table is written to ``<output.dir>/eval/results.{json,md}``.

Determinism: with the same world size, a resumed run reproduces the uninterrupted one bit for
bit on CPU (tested). On CUDA, non-deterministic kernels (e.g. the ``grid_sample`` backward of the
deformable attention) make even two uninterrupted runs differ at rounding level.

Elapsed time (``time_budget_min`` and ``time_cosine``) is the wall-clock time spent in the
training loop, periodic evaluations and checkpoint writes included, summed over resumes; the
final evaluation comes after the budget.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from damex.config import Config, config_to_dict, config_to_yaml, save_config
from damex.engine import checkpoint as ckpt
from damex.engine import distributed as dist_utils
from damex.engine.ema import ModelEMA, unwrap_model
from damex.engine.logging import Progress, RunLogger
from damex.engine.optim import LRScheduler, build_optimizer, build_scheduler
from damex.errors import CheckpointError, ConfigError, DamexError

__all__ = [
    "TrainingError",
    "TrainResult",
    "train",
    "evaluate",
    "build_run_data",
    "build_expert_map",
    "run_dataset_names",
    "load_for_inference",
]

logger = logging.getLogger(__name__)

_EMA_WARMUP = 2000  # updates; the ramp d_t = decay * (1 - exp(-t / 2000)) (see engine.ema)
_RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "config.yaml")


class TrainingError(DamexError, RuntimeError):
    """Training cannot continue (e.g. too many consecutive non-finite losses)."""


@dataclass
class TrainResult:
    """What a finished (or cleanly stopped) run produced.

    Attributes:
        output_dir: the run directory.
        checkpoint: ``last.pth`` (the final weights).
        best_checkpoint: ``best.pth`` or None when no evaluation ran.
        iterations: optimizer steps done (over all resumes).
        epochs: completed epochs.
        stop_reason: ``completed`` | ``max_iters`` | ``time_budget`` | ``signal``.
        nonfinite_steps: steps skipped because of a non-finite loss or gradient.
        elapsed_s: training seconds (over all resumes).
        best_mean_ap: best mean AP over the evaluation datasets (None: never evaluated).
        best_per_dataset: dataset -> ``{"ap", "iteration", "epoch"}`` of its own best AP.
        final_results: the final evaluation (rank 0; None elsewhere or when skipped).
        final_routing: routing statistics of the final evaluation (MoE models; else None), so
            the routing report need not run inference again.
        is_main_process: True on rank 0.
    """

    output_dir: Path
    checkpoint: Path
    best_checkpoint: Path | None = None
    iterations: int = 0
    epochs: int = 0
    stop_reason: str = "completed"
    nonfinite_steps: int = 0
    elapsed_s: float = 0.0
    best_mean_ap: float | None = None
    best_per_dataset: dict[str, dict[str, float]] = field(default_factory=dict)
    final_results: Any = None
    final_routing: Any = None
    is_main_process: bool = True


# ----------------------------------------------------------------------------- run state
@dataclass
class _State:
    iteration: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    epoch_micro: int = 0  # micro-batches consumed in the current epoch
    elapsed_s: float = 0.0
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    best_mean_ap: float | None = None
    best_per_dataset: dict[str, dict[str, float]] = field(default_factory=dict)
    window_sums: dict[str, float] = field(default_factory=dict)
    window_count: int = 0
    window_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "epoch": self.epoch,
            "epoch_micro": self.epoch_micro,
            "elapsed_s": self.elapsed_s,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_consecutive": self.nonfinite_consecutive,
            "best_mean_ap": self.best_mean_ap,
            "best_per_dataset": {k: dict(v) for k, v in self.best_per_dataset.items()},
            "window_sums": dict(self.window_sums),
            "window_count": self.window_count,
            "window_steps": self.window_steps,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _State:
        s = cls()
        for k, v in d.items():
            if hasattr(s, k):
                setattr(s, k, v)
        return s


# ------------------------------------------------------------------------- data and model
def run_dataset_names(cfg: Config) -> list[str]:
    """Datasets of the label space: ``data.train`` then evaluation datasets not trained on."""
    names = list(cfg.data.train)
    names += [n for n in cfg.eval_datasets if n not in names]
    return names


def build_expert_map(cfg: Config, catalog: Any, names: list[str]) -> dict[str, int]:
    """Dataset name -> expert: ``moe.expert_map`` first, then the catalog's default, else -1.

    Raises:
        ConfigError: an expert id outside ``[0, moe.num_experts)``.
    """
    out: dict[str, int] = {}
    for name in names:
        if name in cfg.moe.expert_map:
            e, src = int(cfg.moe.expert_map[name]), f"moe.expert_map.{name}"
        else:
            default = catalog.get(name).expert
            e, src = (-1 if default is None else int(default)), f"catalog expert of {name!r}"
        if cfg.uses_moe and e >= cfg.moe.num_experts:
            raise ConfigError(
                f"{src} = {e} is out of range [0, moe.num_experts={cfg.moe.num_experts})"
            )
        out[name] = e
    return out


def _build_model_parts(cfg: Config, num_classes: int) -> tuple[nn.Module, nn.Module, Any]:
    from damex.modeling import build_model
    from damex.modeling.criterion import build_criterion
    from damex.modeling.postprocess import build_postprocess

    model = build_model(cfg.model, cfg.moe, num_classes)
    criterion = build_criterion(cfg, num_classes)
    postprocess = build_postprocess(cfg)
    return model, criterion, postprocess


@dataclass
class _RunData:
    catalog: Any
    label_space: Any
    expert_map: dict[str, int]
    expert_of_dataset: torch.Tensor


def build_run_data(cfg: Config, *, label_space_state: dict[str, Any] | None = None) -> _RunData:
    """Catalog, label space (or the checkpoint's) and dataset -> expert table of a run."""
    from damex.data.catalog import build_catalog
    from damex.data.label_space import LabelSpace, build_label_space

    catalog = build_catalog(cfg.data)
    names = run_dataset_names(cfg)
    if any(_is_synthetic(catalog, n, cfg) for n in names):
        _ensure_synthetic(cfg)
    if label_space_state is not None:
        label_space = LabelSpace.from_state_dict(label_space_state)
        missing = [n for n in names if n not in label_space.dataset_names]
        if missing:
            raise CheckpointError(
                f"the checkpoint's label space has datasets {label_space.dataset_names}; the "
                f"config also needs {missing}"
            )
    else:
        label_space = build_label_space(catalog, names, policy=cfg.data.label_policy)
    expert_map = build_expert_map(cfg, catalog, label_space.dataset_names)
    table = torch.tensor([expert_map[n] for n in label_space.dataset_names], dtype=torch.int64)
    return _RunData(catalog, label_space, expert_map, table)


def _is_synthetic(catalog: Any, name: str, cfg: Config) -> bool:
    spec = catalog.get(name)
    root = Path(cfg.data.synthetic.root).resolve()
    try:
        Path(spec.image_root).resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _ensure_synthetic(cfg: Config) -> None:
    """Generate the built-in benchmark on first use (rank 0; the others wait)."""
    err = None
    if dist_utils.is_main_process():
        from damex.data.synthetic import ensure_benchmark

        try:
            ensure_benchmark(cfg.data.synthetic)
        except (DamexError, OSError) as e:
            root = cfg.data.synthetic.root
            err = f"data.synthetic: cannot generate the benchmark under {root}: {e}"
    err = dist_utils.broadcast_object(err)
    if err:
        raise ConfigError(err)
    dist_utils.barrier()


# ------------------------------------------------------------------------------ helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _amp_dtype(amp: str) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _prepare_output_dir(cfg: Config, resuming: bool) -> Path:
    """Create the run directory; refuse to clobber another run (checked on rank 0)."""
    out = Path(cfg.output.dir)
    err = None
    if dist_utils.is_main_process():
        existing = [f for f in _RUN_FILES if (out / f).exists()]
        existing += sorted(p.name for p in out.glob("epoch_*.pth"))
        if existing and not resuming and not cfg.output.overwrite:
            err = (
                f"output.dir {out} already holds a run ({', '.join(existing[:4])}); resume it "
                "(--resume), choose another output.dir, or set output.overwrite=true"
            )
        elif existing and not resuming:
            logger.warning("output.overwrite: removing the previous run's files in %s", out)
            for f in existing:
                (out / f).unlink(missing_ok=True)
            for d in ("tb", "eval"):
                if (out / d).is_dir():
                    shutil.rmtree(out / d)
        if err is None:
            out.mkdir(parents=True, exist_ok=True)
    err = dist_utils.broadcast_object(err)
    if err:
        raise ConfigError(err)
    dist_utils.barrier()
    return out


def _resolve_resume(cfg: Config, resume: str | bool) -> Path | None:
    if resume is False or resume is None or resume == "":
        return None
    if resume is True or resume == "auto":
        path = ckpt.last_path(cfg.output.dir)
    else:
        path = Path(str(resume))
    if not path.is_file():
        raise CheckpointError(f"cannot resume: checkpoint {path} does not exist")
    return path


def _diff_config(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff_config(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class _StopFlag:
    """SIGTERM / SIGINT -> stop at the next step boundary with a checkpoint (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: default behaviour
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = True
        logger.warning("signal %d: stopping after this step (checkpoint will be written)", signum)

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, old)


# ------------------------------------------------------------------------------- training
class _Trainer:
    def __init__(self, cfg: Config, resume_path: Path | None) -> None:
        self.cfg = cfg
        self.tcfg = cfg.train
        self.resume_path = resume_path
        self.info = dist_utils.init_distributed(cfg.train.device)
        self.device = self.info.device
        self.is_main = self.info.is_main
        self.amp_dtype = _amp_dtype(cfg.train.amp)
        self.state = _State()

    # -------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg, tcfg = self.cfg, self.tcfg
        resume_state = None
        if self.resume_path is not None:
            resume_state = ckpt.load_checkpoint(
                self.resume_path,
                required_keys=(
                    "model", "optimizer", "scheduler", "sampler", "rng", "trainer",
                    "label_space", "config",
                ),
            )  # fmt: skip
            changed = _diff_config(resume_state["config"], config_to_dict(cfg))
            if changed:
                logger.warning(
                    "resuming %s with a changed config: %s", self.resume_path, "; ".join(changed)
                )
        self.out_dir = _prepare_output_dir(cfg, resuming=resume_state is not None)
        if self.is_main:
            save_config(cfg, self.out_dir / "config.yaml")

        _seed_everything(tcfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        self.data = build_run_data(
            cfg, label_space_state=resume_state["label_space"] if resume_state else None
        )
        ls = self.data.label_space
        from damex.data.loader import build_test_loaders, build_train_loader

        self.loader, self.sampler, train_sets = build_train_loader(
            cfg,
            self.data.catalog,
            ls,
            self.data.expert_of_dataset,
            self.info.rank,
            self.info.world_size,
        )
        del train_sets  # (CocoDetection checks every label < num_classes at load: DINO#81, Q6)
        self.test_loaders = build_test_loaders(
            cfg,
            self.data.catalog,
            ls,
            None,
            self.info.rank,
            self.info.world_size,
            expert_of_dataset=self.data.expert_of_dataset,
        )
        logger.info("label space: %d classes over %s", ls.num_classes, ls.dataset_names)
        logger.info("dataset -> expert: %s", self.data.expert_map)

        model, self.criterion, self.postprocess = _build_model_parts(cfg, ls.num_classes)
        self.model = model.to(self.device)
        self.criterion.to(self.device)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("model: %.2fM parameters", n_params / 1e6)

        self.optimizer = build_optimizer(self.model, tcfg)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        micro_per_epoch = len(self.sampler)
        self.iters_per_epoch = micro_per_epoch // tcfg.grad_accum
        if self.iters_per_epoch < 1:
            raise ConfigError(
                f"train.grad_accum={tcfg.grad_accum} exceeds the {micro_per_epoch} batches per "
                "rank of an epoch"
            )
        planned = tcfg.epochs * self.iters_per_epoch
        self.total_iters = min(planned, tcfg.max_iters) if tcfg.max_iters > 0 else planned
        self.scheduler: LRScheduler = build_scheduler(
            self.optimizer, tcfg, iters_per_epoch=self.iters_per_epoch, total_iters=self.total_iters
        )
        self.scaler = None
        if tcfg.amp == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.ema = (
            ModelEMA(self.model, decay=tcfg.ema_decay, warmup=_EMA_WARMUP) if tcfg.ema else None
        )

        self.ddp: nn.Module = self.model
        if self.info.distributed:
            self.ddp = self._wrap_ddp(self.model)

        self._rng_after_iter: dict[str, Any] | None = None
        if resume_state is not None:
            self._load_resume_state(resume_state)
        self.run_log = RunLogger(
            self.out_dir,
            enabled=self.is_main,
            tensorboard=cfg.output.tensorboard,
            resume_iter=self.state.iteration if resume_state is not None else None,
        )
        if resume_state is None:
            _seed_everything(tcfg.seed + self.info.rank)  # official: seed + rank

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # MoE experts without tokens, the DN label table without GT, etc. get no gradient
        kwargs: dict[str, Any] = {"find_unused_parameters": True}
        if self.device.type == "cuda":
            kwargs["device_ids"] = [self.device.index]
        return DDP(model, **kwargs)

    def _load_resume_state(self, st: dict[str, Any]) -> None:
        path = self.resume_path
        ckpt.load_model_state(self.model, st["model"], path=path)
        try:
            self.optimizer.load_state_dict(st["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not match: {e}") from e
        self.scheduler.load_state_dict(st["scheduler"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None:
            if st.get("ema"):
                self.ema.load_state_dict(st["ema"])
            else:
                logger.warning("checkpoint %s has no EMA state; EMA restarts from the model", path)
                self.ema = ModelEMA(self.model, decay=self.tcfg.ema_decay, warmup=_EMA_WARMUP)
        self.state = _State.from_dict(st["trainer"])
        world = int(st["trainer"].get("world_size", 1))
        rngs = st["rng"]
        rng = rngs[self.info.rank] if self.info.rank < len(rngs) else None
        if world != self.info.world_size:
            logger.warning(
                "checkpoint %s was written by %d processes, now %d: the continuation is not "
                "bit-exact",
                path,
                world,
                self.info.world_size,
            )
        if self.state.epoch_micro > 0:
            try:
                self.sampler.load_state_dict(st["sampler"])
            except ValueError as e:
                raise CheckpointError(f"checkpoint {path}: {e}") from e
            self._rng_after_iter = rng  # restored once the epoch's iterator exists
        elif rng is not None:
            ckpt.restore_rng_state(rng)
        logger.info(
            "resumed %s: iteration %d, epoch %d (+%d batches), %.0f s trained",
            path,
            self.state.iteration,
            self.state.epoch,
            self.state.epoch_micro,
            self.state.elapsed_s,
        )

    # ----------------------------------------------------------------------- checkpoints
    def _full_state(self) -> dict[str, Any]:
        rngs = dist_utils.all_gather_object(ckpt.capture_rng_state())
        trainer = self.state.to_dict()
        trainer["world_size"] = self.info.world_size
        trainer["iters_per_epoch"] = self.iters_per_epoch
        if self.state.epoch_micro > 0:
            sampler_state = self.sampler.state_dict()
        else:  # epoch boundary: the next epoch starts from its beginning
            sampler_state = {"epoch": self.state.epoch, "global_batches_consumed": 0}
        return {
            **self._meta(),
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "sampler": sampler_state,
            "rng": rngs,
            "trainer": trainer,
        }

    def _meta(self) -> dict[str, Any]:
        from damex import __version__

        return {
            "format": ckpt.CHECKPOINT_FORMAT,
            "damex_version": __version__,
            "config": config_to_dict(self.cfg),
            "config_yaml": config_to_yaml(self.cfg),
            "label_space": self.data.label_space.state_dict(),
            "expert_map": dict(self.data.expert_map),
            "iteration": self.state.iteration,
            "epoch": self.state.epoch,
        }

    def save(self, *, epoch_file: bool = False) -> None:
        state = self._full_state()  # collective (RNG gather): every rank calls it
        if self.is_main:
            t0 = time.perf_counter()
            ckpt.save_checkpoint(ckpt.last_path(self.out_dir), state)
            if epoch_file:
                ckpt.save_checkpoint(ckpt.epoch_path(self.out_dir, self.state.epoch), state)
            logger.info(
                "checkpoint %s written (iteration %d, %.1f s)",
                ckpt.last_path(self.out_dir),
                self.state.iteration,
                time.perf_counter() - t0,
            )
        dist_utils.barrier()

    def save_best(self, results: Any) -> None:
        if not self.is_main:
            return
        eval_model = self.ema.module if self.ema is not None else unwrap_model(self.model)
        state = {
            **self._meta(),
            "model": eval_model.state_dict(),
            "ema": None,
            "weights": "ema" if self.ema is not None else "model",
            "metrics": results.to_dict(),
        }
        ckpt.save_checkpoint(ckpt.best_path(self.out_dir), state)

    # ------------------------------------------------------------------------ evaluation
    def run_eval(self, *, final: bool) -> Any:
        from damex.engine.inference import run_inference

        if not self.test_loaders:
            return None
        eval_model = self.ema.module if self.ema is not None else self.model
        t0 = time.perf_counter()
        want_routing = final and self.cfg.uses_moe  # the final report reuses these counts
        results, routing = run_inference(
            eval_model,
            self.postprocess,
            self.test_loaders,
            self.data.label_space,
            routing_stats=want_routing,
            restrict=self.cfg.eval.restrict_to_dataset_labels,
            amp_dtype=self.amp_dtype,
            routing_tokens=self.cfg.eval.routing_tokens,
            expert_of_dataset=self.data.expert_of_dataset,
            matcher=self.criterion.matcher if want_routing else None,
        )
        self._last_routing = routing
        improved = False
        if self.is_main and results is not None:
            st = self.state
            mean_ap = float(results.mean_ap)
            logger.info(
                "evaluation at iteration %d (%.1f s):\n%s",
                st.iteration,
                time.perf_counter() - t0,
                results.to_markdown(),
            )
            record: dict[str, Any] = {
                "iter": st.iteration,
                "epochs_done": st.epoch
                if st.epoch_micro == 0
                else st.epoch + st.epoch_micro / (self.iters_per_epoch * self.tcfg.grad_accum),
                "mean_ap": mean_ap,
                "mean_ap50": float(results.mean_ap50),
                "final": final,
            }
            for name, m in results.datasets.items():
                record[f"ap/{name}"] = float(m.ap)
                record[f"ap50/{name}"] = float(m.ap50)
                best = st.best_per_dataset.get(name)
                if best is None or m.ap > best["ap"]:
                    st.best_per_dataset[name] = {
                        "ap": float(m.ap),
                        "iteration": st.iteration,
                        "epoch": st.epoch,
                    }
            if st.best_mean_ap is None or mean_ap > st.best_mean_ap:
                st.best_mean_ap = mean_ap
                improved = True
            record["best_mean_ap"] = st.best_mean_ap
            self.run_log.log(record, step=st.iteration, prefix="eval")
            if improved:
                self.save_best(results)
                logger.info("new best mean AP %.4f -> %s", mean_ap, ckpt.best_path(self.out_dir))
        # every rank keeps the same view of the best values (they go into checkpoints)
        best = dist_utils.broadcast_object((self.state.best_mean_ap, self.state.best_per_dataset))
        self.state.best_mean_ap, self.state.best_per_dataset = best
        return results

    # ------------------------------------------------------------------------- the loop
    def _micro_batches(self) -> Iterator[Any]:
        """This epoch's remaining micro-batches (restores the RNG once the iterator exists)."""
        self.sampler.set_epoch(self.state.epoch)
        it = iter(self.loader)
        if self._rng_after_iter is not None:
            ckpt.restore_rng_state(self._rng_after_iter)
            self._rng_after_iter = None
        yield from it

    def _forward_loss(self, batch: Any) -> dict[str, torch.Tensor]:
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            out = self.ddp(batch)
        return self.criterion(out, batch)

    def _accumulate(self, losses: dict[str, torch.Tensor]) -> None:
        st = self.state
        for k, v in losses.items():
            if k == "loss" or k.startswith(("loss_", "unweighted/", "stat/")):
                val = float(v.detach())
                if math.isfinite(val):
                    st.window_sums[k] = st.window_sums.get(k, 0.0) + val
                    st.window_sums[f"#{k}"] = st.window_sums.get(f"#{k}", 0.0) + 1.0
        st.window_count += 1

    def _log_window(self, lr: float, grad_norm: float) -> None:
        st = self.state
        local = {
            k: torch.tensor(v / st.window_sums[f"#{k}"])
            for k, v in st.window_sums.items()
            if not k.startswith("#") and st.window_sums.get(f"#{k}", 0.0) > 0
        }
        # same keys on every rank (a NaN-only stat may be absent on one): gather the key union
        keys = sorted(set().union(*dist_utils.all_gather_object(sorted(local))))
        vals = {k: local.get(k, torch.tensor(float("nan"))) for k in keys}
        means = dist_utils.reduce_dict_mean(vals)
        dt = max(time.perf_counter() - self._window_t0, 1e-9)
        record = {
            "iter": st.iteration,
            "epoch": st.epoch,
            "lr": lr,
            **{k: means[k] for k in keys},
            "grad_norm": grad_norm,
            "it_s": st.window_steps / dt,
            "time": st.elapsed_s,
            "nonfinite": st.nonfinite_total,
        }
        self.run_log.log(record, step=st.iteration)
        st.window_sums, st.window_count, st.window_steps = {}, 0, 0
        self._window_t0 = time.perf_counter()

    def _flags(self, nonfinite: bool, stop: bool) -> tuple[bool, bool]:
        """Agree over ranks on (skip this step, stop now)."""
        if not self.info.distributed:
            return nonfinite, stop
        t = torch.tensor([float(nonfinite), float(stop)])
        t = dist_utils.all_reduce_sum(t)
        return bool(t[0] > 0), bool(t[1] > 0)

    def fit(self) -> TrainResult:
        tcfg, st = self.tcfg, self.state
        accum = tcfg.grad_accum
        micro_per_epoch = self.iters_per_epoch * accum
        progress = Progress(total=self.total_iters, initial=st.iteration, enabled=self.is_main)
        stop_reason = "completed"
        loop_t0 = time.perf_counter()
        elapsed0 = st.elapsed_s
        self._window_t0 = time.perf_counter()
        self.ddp.train()
        self.criterion.train()
        with _StopFlag() as stop_flag:
            self._stop_flag = stop_flag
            while st.epoch < tcfg.epochs and stop_reason == "completed":
                micro_in_step = 0
                step_nonfinite = False
                for batch in self._micro_batches():
                    batch = batch.to(self.device, non_blocking=self.device.type == "cuda")
                    micro_in_step += 1
                    st.epoch_micro += 1
                    step_nonfinite |= not self._micro_step(batch, last=micro_in_step == accum)
                    if micro_in_step < accum:
                        continue
                    micro_in_step = 0
                    st.elapsed_s = elapsed0 + time.perf_counter() - loop_t0
                    stop_reason = self._optimizer_step(step_nonfinite, progress)
                    step_nonfinite = False
                    if stop_reason != "completed" or st.epoch_micro >= micro_per_epoch:
                        break
                if st.epoch_micro >= micro_per_epoch:
                    st.epoch += 1
                    st.epoch_micro = 0
                    self.on_epoch_end(st.epoch)
                    self._saved_iter = st.iteration
                elif stop_reason == "completed":
                    raise TrainingError(
                        f"the training loader ended after {st.epoch_micro} of {micro_per_epoch} "
                        f"batches of epoch {st.epoch}"
                    )
            st.elapsed_s = elapsed0 + time.perf_counter() - loop_t0
        progress.close()
        if stop_reason != "completed":
            logger.info("stopping at iteration %d: %s", st.iteration, stop_reason)
        results = self._last_results if self._last_eval_iter == st.iteration else None
        if stop_reason != "signal" and self._last_eval_iter != st.iteration:
            results = self.run_eval(final=True)
        if self.is_main and results is not None:  # the summary (detections: damex evaluate)
            (self.out_dir / "eval").mkdir(exist_ok=True)
            (self.out_dir / "eval" / "results.json").write_text(results.to_json() + "\n")
            (self.out_dir / "eval" / "results.md").write_text(results.to_markdown())
        if self._saved_iter != st.iteration:
            self.save()
        self.run_log.close()
        best = ckpt.best_path(self.out_dir)
        return TrainResult(
            output_dir=self.out_dir,
            checkpoint=ckpt.last_path(self.out_dir),
            best_checkpoint=best if best.exists() else None,
            iterations=st.iteration,
            epochs=st.epoch,
            stop_reason=stop_reason,
            nonfinite_steps=st.nonfinite_total,
            elapsed_s=st.elapsed_s,
            best_mean_ap=st.best_mean_ap,
            best_per_dataset=st.best_per_dataset,
            final_results=results,
            final_routing=self._last_routing,
            is_main_process=self.is_main,
        )

    def _micro_step(self, batch: Any, *, last: bool) -> bool:
        """Forward, loss and backward of one micro-batch; returns whether the loss is finite."""
        sync = contextlib.nullcontext()
        if self.info.distributed and not last:
            sync = self.ddp.no_sync()
        with sync:
            losses = self._forward_loss(batch)
            loss = losses["loss"]
            finite = bool(torch.isfinite(loss.detach()))
            if finite or self.info.distributed:
                # under DDP every rank must run backward (gradient sync); poisoned gradients are
                # discarded by the skipped step
                scaled = loss / self.tcfg.grad_accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
        if finite:
            self._accumulate(losses)
        return finite

    def _optimizer_step(self, nonfinite: bool, progress: Progress) -> str:
        """Clip, step (or skip), schedule, EMA, log; returns the stop reason or "completed"."""
        tcfg, st = self.tcfg, self.state
        budget_s = tcfg.time_budget_min * 60.0
        want_stop = self._stop_flag.requested or (budget_s > 0 and st.elapsed_s >= budget_s)
        skip, stop_now = self._flags(nonfinite, want_stop)
        grad_norm = float("nan")
        if not skip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            max_norm = tcfg.clip_max_norm if tcfg.clip_max_norm > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
            if self.scaler is not None:
                # fp16: the scaler skips inf/NaN gradients itself and lowers the scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                skip = True
        self.optimizer.zero_grad(set_to_none=True)
        if skip:
            st.nonfinite_total += 1
            st.nonfinite_consecutive += 1
            logger.warning(
                "step %d: non-finite loss or gradient, step skipped (%d in a row, %d in total)",
                st.iteration + 1,
                st.nonfinite_consecutive,
                st.nonfinite_total,
            )
            if st.nonfinite_consecutive >= tcfg.max_nonfinite:
                progress.close()
                self.run_log.close()
                kept = ckpt.last_path(self.out_dir)
                raise TrainingError(
                    f"{st.nonfinite_consecutive} consecutive non-finite losses/gradients up to "
                    f"step {st.iteration + 1} (train.max_nonfinite={tcfg.max_nonfinite}); "
                    f"stopping. The last good checkpoint "
                    f"{kept if kept.exists() else '(none written yet)'} is kept. Lower "
                    "train.lr, raise train.warmup_iters, check the data, or use train.amp=none."
                )
        else:
            st.nonfinite_consecutive = 0
            if self.ema is not None:
                self.ema.update(self.model)
        lr_used = float(self.optimizer.param_groups[0]["lr"])
        st.iteration += 1
        st.window_steps += 1
        if not skip:
            self._last_grad_norm = grad_norm
        self.scheduler.step(elapsed_s=st.elapsed_s)
        mean_loss = st.window_sums.get("loss", 0.0) / max(st.window_sums.get("#loss", 0.0), 1.0)
        progress.update(1, loss=mean_loss, lr=lr_used)
        end_of_epoch = st.epoch_micro >= self.iters_per_epoch * tcfg.grad_accum
        if st.iteration % tcfg.log_every == 0 or end_of_epoch:
            self._log_window(lr_used, self._last_grad_norm)
        if tcfg.max_iters > 0 and st.iteration >= tcfg.max_iters:
            return "max_iters"
        if stop_now:
            return "signal" if self._stop_flag.requested else "time_budget"
        return "completed"

    _last_eval_iter: int = -1
    _last_results: Any = None
    _last_routing: Any = None
    _saved_iter: int = -1
    _last_grad_norm: float = float("nan")

    def on_epoch_end(self, epoch: int) -> None:
        """After ``epoch`` completed epochs: periodic evaluation and checkpoints."""
        tcfg = self.tcfg
        is_last = epoch >= tcfg.epochs
        if tcfg.eval_every > 0 and epoch % tcfg.eval_every == 0 or is_last:
            self._last_results = self.run_eval(final=is_last)
            self._last_eval_iter = self.state.iteration
        epoch_file = tcfg.checkpoint_every > 0 and epoch % tcfg.checkpoint_every == 0
        self.save(epoch_file=epoch_file)


def train(cfg: Config, resume: str | bool = False) -> TrainResult:
    """Train (and evaluate) a detector as described by ``cfg``.

    Args:
        cfg: the resolved config.
        resume: False for a new run; True or ``"auto"`` to continue ``output.dir/last.pth``;
            a path to continue from that checkpoint. The continuation is exact: the losses
            logged after resuming equal those of an uninterrupted run (same world size).

    Returns:
        A :class:`TrainResult` (every rank; evaluation results on rank 0 only).

    Raises:
        ConfigError: invalid settings, or ``output.dir`` holds another run (without
            ``output.overwrite`` / resume).
        CheckpointError: the resume checkpoint is missing, corrupt or does not match.
        TrainingError: ``train.max_nonfinite`` consecutive non-finite steps.
    """
    resume_path = _resolve_resume(cfg, resume)
    owns_group = not dist_utils.is_distributed()
    trainer = _Trainer(cfg, resume_path)
    try:
        trainer.setup()
        return trainer.fit()
    finally:
        if owns_group:
            dist_utils.cleanup()


# ----------------------------------------------------------------------------- evaluate
def load_for_inference(
    cfg: Config,
    checkpoint: str | os.PathLike[str],
    *,
    device: torch.device | None = None,
    use_ema: bool | None = None,
) -> tuple[nn.Module, Any, _RunData, dict[str, Any]]:
    """Model (eval mode, weights loaded), postprocess, run data and the checkpoint dict.

    The label space comes from the checkpoint (the head was trained for it); the model is built
    from ``cfg`` and must match the checkpoint's weights.

    Args:
        cfg: the config (model / moe sections must be the training ones).
        checkpoint: ``last.pth``, ``best.pth`` or ``epoch_XXXX.pth``.
        device: default: ``train.device``.
        use_ema: load the EMA weights when the checkpoint has them (default: yes).
    """
    path = Path(checkpoint)
    state = ckpt.load_checkpoint(path, required_keys=("model", "label_space"))
    data = build_run_data(cfg, label_space_state=state["label_space"])
    model, _, postprocess = _build_model_parts(cfg, data.label_space.num_classes)
    weights = state["model"]
    if state.get("ema") and use_ema is not False:
        weights = state["ema"]["module"]
        logger.info("evaluating the EMA weights of %s", path)
    ckpt.load_model_state(model, weights, path=path)
    dev = device or dist_utils.resolve_device(cfg.train.device)
    model.to(dev).eval()
    return model, postprocess, data, state


def evaluate(
    cfg: Config,
    checkpoint: str | os.PathLike[str],
    datasets: list[str] | None = None,
    restrict: bool = False,
) -> Any:
    """Per-dataset COCO AP of a checkpoint on the evaluation datasets.

    Args:
        cfg: the run config (``eval`` section: batch size, ``max_images``, ``num_select``).
        checkpoint: a checkpoint written by :func:`train`.
        datasets: subset of the evaluation datasets (default ``cfg.eval_datasets``).
        restrict: also compute the ``restrict_to_dataset_labels`` oracle.

    Returns:
        ``EvalResults`` on rank 0 (None on other ranks under torchrun).
    """
    from damex.data.loader import build_test_loaders
    from damex.engine.inference import run_inference

    info = dist_utils.init_distributed(cfg.train.device)
    if datasets:
        unknown = [d for d in datasets if d not in cfg.eval_datasets + cfg.data.train]
        if unknown:
            raise ConfigError(
                f"--datasets {unknown} are not evaluation datasets of the config "
                f"({cfg.eval_datasets})"
            )
        from dataclasses import replace

        cfg = replace(cfg, eval=replace(cfg.eval, datasets=list(datasets)))
    model, postprocess, data, _ = load_for_inference(cfg, checkpoint, device=info.device)
    loaders = build_test_loaders(
        cfg,
        data.catalog,
        data.label_space,
        None,
        info.rank,
        info.world_size,
        expert_of_dataset=data.expert_of_dataset,
    )
    results, _ = run_inference(
        model,
        postprocess,
        loaders,
        data.label_space,
        routing_stats=False,
        restrict=restrict or cfg.eval.restrict_to_dataset_labels,
        amp_dtype=_amp_dtype(cfg.train.amp),
    )
    return results
