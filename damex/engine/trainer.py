"""The training loop: ``train(cfg, resume)`` -> :class:`TrainResult`.

One process per device under ``torchrun`` (DDP when ``WORLD_SIZE > 1``; NCCL on CUDA, gloo on
CPU) or a single process. :meth:`Trainer.run_step` is one optimizer step: ``train.grad_accum``
micro-batches (forward under optional bf16 / fp16 autocast, loss outside autocast, backward;
DDP gradient sync on the last micro-batch only), gradient clipping at ``train.clip_max_norm``,
AdamW step. Everything around it is a hook (:mod:`damex.engine.hooks`): lr schedule and
budgets, EMA, logging, evaluation and best checkpoint, periodic checkpoints, signals.

Non-finite losses: a step whose loss (on any rank) or gradient norm is NaN/inf is skipped (no
parameter update) and counted; ``train.max_nonfinite`` consecutive skipped steps stop the run
with a ``TrainingError`` and the last checkpoint written before is kept untouched.

Checkpoints (``damex.engine.checkpoint``): ``last.pth`` at the end of every epoch, when the run
stops early (``max_iters``, ``time_budget_min``, SIGTERM / SIGINT) and at the end; ``best.pth``
(weights only) when the mean AP over the evaluation datasets improves; ``epoch_XXXX.pth`` every
``train.checkpoint_every`` epochs. A checkpoint holds everything an exact resume needs: model,
optimizer, scheduler, GradScaler, EMA, the sampler position (mid-epoch), the torch / numpy /
python RNG states of every rank, the iteration counters, the elapsed training time (the
``time_cosine`` schedule is a function of it) and the logging window (:class:`TrainState`).

Determinism: with the same world size, a resumed run reproduces the uninterrupted one bit for
bit on CPU (tested). On CUDA, non-deterministic kernels (e.g. the ``grid_sample`` backward of the
deformable attention) make even two uninterrupted runs differ at rounding level.

Elapsed time (``time_budget_min`` and ``time_cosine``) is the wall-clock time spent in the
training loop, periodic evaluations and checkpoint writes included, summed over resumes; the
final evaluation comes after the budget.

Where to add behaviour (seams):

* a new per-step or per-epoch behaviour: a :class:`~damex.engine.hooks.HookBase` subclass added
  in :meth:`Trainer.build_hooks` (or ``trainer.register_hooks`` before :meth:`Trainer.fit`);
* how the model is built or initialised (e.g. upcycling from a dense checkpoint: new runs only,
  a resume loads its own weights later): :meth:`Trainer.build_model`;
* how the model is wrapped for data / expert parallelism: :meth:`Trainer.wrap_model`;
* how gradients are unscaled, synchronised across expert groups and clipped:
  :meth:`Trainer.clip_gradients`;
* which checkpoint a resume reads (e.g. falling back to the previous good one):
  ``resolve_resume`` / ``load_resume_checkpoint`` in :mod:`damex.engine.run_dir`;
* the run data, e.g. the dataset -> expert map (``moe.expert_map: auto``, computed once at the
  start of a new run and saved in every checkpoint's ``expert_map``) or a label space extended
  by new datasets: :meth:`Trainer.build_run_data` (over
  :func:`damex.engine.run_data.build_run_data`);
* what a checkpoint holds and how a resume reads it back (e.g. gathering expert-parallel
  shards on rank 0): :meth:`Trainer.training_checkpoint` and :meth:`Trainer.best_checkpoint`,
  :meth:`Trainer.restore`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from damex import __version__
from damex.config import Config, config_to_dict, config_to_yaml, save_config
from damex.data.loader import build_train_loader
from damex.engine import checkpoint as ckpt
from damex.engine import distributed as dist_utils
from damex.engine import expert_parallel
from damex.engine.ema import ModelEMA
from damex.engine.hooks import (
    EMAUpdate,
    Evaluation,
    HookBase,
    LRScheduleAndBudget,
    MetricsLogger,
    PeriodicCheckpoint,
    StopOnSignal,
)
from damex.engine.logging import RunLogger
from damex.engine.moe_schedule import MoELossSchedule
from damex.engine.optim import build_optimizer, build_scheduler, load_scheduler_state
from damex.engine.propose import resolve_auto_expert_map
from damex.engine.run_data import RunData, amp_dtype, build_model_parts, build_run_data
from damex.engine.run_dir import load_resume_checkpoint, prepare_output_dir, resolve_resume
from damex.engine.upcycle import upcycle_from_checkpoint
from damex.errors import CheckpointError, ConfigError, DamexError
from damex.structures import Batch

__all__ = ["TrainingError", "TrainResult", "TrainState", "StepInfo", "Trainer", "train"]

logger = logging.getLogger(__name__)

_EMA_WARMUP = 2000  # updates; the ramp d_t = decay * (1 - exp(-t / 2000)) (see engine.ema)
_STOP_REASONS = ("max_iters", "signal", "time_budget")  # by priority when several apply


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


@dataclass
class TrainState:
    """The counters of a run; checkpointed (``"trainer"``) for an exact resume."""

    iteration: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    epoch_micro: int = 0  # micro-batches consumed in the current epoch
    elapsed_s: float = 0.0
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    best_mean_ap: float | None = None
    best_per_dataset: dict[str, dict[str, float]] = field(default_factory=dict)
    window_sums: dict[str, float] = field(default_factory=dict)  # logging window (hooks)
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
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        s = cls()
        for k, v in d.items():
            if hasattr(s, k):
                setattr(s, k, v)
        return s


@dataclass
class StepInfo:
    """What the last :meth:`Trainer.run_step` did (read by the hooks).

    Attributes:
        lr: learning rate of the first parameter group during the step.
        grad_norm: total gradient norm before clipping (NaN when not computed).
        skipped: no parameter update (non-finite loss or gradient on some rank).
        losses: the loss terms of every finite micro-batch, as floats.
    """

    lr: float = float("nan")
    grad_norm: float = float("nan")
    skipped: bool = False
    losses: list[dict[str, float]] = field(default_factory=list)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _loss_scalars(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged terms of a criterion output (total, weighted, unweighted, statistics)."""
    return {
        k: float(v.detach())
        for k, v in losses.items()
        if k == "loss" or k.startswith(("loss_", "unweighted/", "stat/"))
    }


def checkpoint_meta(cfg: Config, data: RunData, state: TrainState) -> dict[str, Any]:
    """The part of every checkpoint that describes the run (config, label space, experts)."""
    return {
        "format": ckpt.CHECKPOINT_FORMAT,
        "damex_version": __version__,
        "config": config_to_dict(cfg),
        "config_yaml": config_to_yaml(cfg),
        "label_space": data.label_space.state_dict(),
        "expert_map": dict(data.expert_map),
        "iteration": state.iteration,
        "epoch": state.epoch,
    }


class Trainer:
    """The loop (:meth:`run_step`, :meth:`fit`) and the parts it steps; see the module doc.

    Use: ``Trainer(cfg, resume_path)``, :meth:`setup`, :meth:`fit` (what :func:`train` does).
    """

    def __init__(self, cfg: Config, resume_path: Path | None) -> None:
        self.cfg = cfg
        self.tcfg = cfg.train
        self.resume_path = resume_path
        self.info = dist_utils.init_distributed(cfg.train.device)
        self.device = self.info.device
        self.is_main = self.info.is_main
        self.amp_dtype = amp_dtype(cfg.train.amp)
        self.state = TrainState()
        self.step_info = StepInfo()
        self.stop_reason: str | None = None
        self.hooks: list[HookBase] = []
        self._stop_requests: set[str] = set()
        self._data_iter: Any = None
        self._rng_after_iter: dict[str, Any] | None = None
        self._loop_t0 = 0.0
        self._elapsed0 = 0.0

    # -------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Build data, model, optimizer and hooks; restore the resume checkpoint if any.

        The order fixes the random streams (model init, sampler), so a resumed run and an
        uninterrupted one see the same numbers.
        """
        cfg, tcfg = self.cfg, self.tcfg
        resume_state = None
        if self.resume_path is not None:
            resume_state = load_resume_checkpoint(self.resume_path, config_to_dict(cfg))
        self.out_dir = prepare_output_dir(cfg, resuming=resume_state is not None)
        if self.is_main:
            save_config(cfg, self.out_dir / "config.yaml")
        _seed_everything(tcfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        self.data = self.build_run_data(resume_state["label_space"] if resume_state else None)
        self._build_loaders()
        self.model, self.criterion, self.postprocess = self.build_model()
        self._build_optimization()
        self.ddp = self.wrap_model(self.model)
        if resume_state is not None:
            self.restore(resume_state)
        self.run_log = RunLogger(
            self.out_dir,
            enabled=self.is_main,
            tensorboard=cfg.output.tensorboard,
            resume_iter=self.state.iteration if resume_state is not None else None,
        )
        if resume_state is None:
            _seed_everything(tcfg.seed + self.info.rank)  # official: seed + rank
        self.register_hooks(self.build_hooks())

    def build_run_data(self, label_space_state: dict[str, Any] | None) -> RunData:
        """Datasets, label space (the checkpoint's on a resume) and dataset -> expert table.

        The seam for run data computed at the start of training (e.g. ``moe.expert_map:
        auto``, or a model extended by new datasets).
        """
        return build_run_data(self.cfg, label_space_state=label_space_state)

    def _build_loaders(self) -> None:
        cfg, data, info = self.cfg, self.data, self.info
        self.loader, self.sampler, _ = build_train_loader(
            cfg, data.catalog, data.label_space, data.expert_of_dataset, info.rank, info.world_size
        )  # (CocoDetection checks every label < num_classes at load: DINO#81)
        self.test_loaders = data.test_loaders(cfg, info.rank, info.world_size)
        ls = data.label_space
        logger.info("label space: %d classes over %s", ls.num_classes, ls.dataset_names)
        logger.info("dataset -> expert: %s", data.expert_map)

    def build_model(self) -> tuple[nn.Module, nn.Module, Any]:
        """Model, criterion and postprocess on the device (random init from ``train.seed``).

        The seam for initialising a new run's weights from elsewhere (e.g. upcycling a dense
        checkpoint); a resume overwrites the weights afterwards (:meth:`setup`).
        """
        model, criterion, postprocess = build_model_parts(
            self.cfg, self.data.label_space.num_classes
        )
        upcycle = self.cfg.moe.upcycle_from and self.cfg.uses_moe
        if upcycle and self.resume_path is None:  # sparse upcycling (a resume has its weights)
            upcycle_from_checkpoint(
                model,
                self.cfg.moe.upcycle_from,
                noise=self.cfg.moe.upcycle_noise,
                seed=self.tcfg.seed,
            )
        model.to(self.device)
        criterion.to(self.device)
        logger.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
        return model, criterion, postprocess

    def _build_optimization(self) -> None:
        """Optimizer, step counts, lr scheduler, fp16 GradScaler and EMA."""
        tcfg = self.tcfg
        self.optimizer = build_optimizer(self.model, tcfg)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        batches_per_epoch = len(self.sampler)
        self.iters_per_epoch = batches_per_epoch // tcfg.grad_accum
        if self.iters_per_epoch < 1:
            raise ConfigError(
                f"train.grad_accum={tcfg.grad_accum} exceeds the {batches_per_epoch} batches per "
                "rank of an epoch"
            )
        self.micro_per_epoch = self.iters_per_epoch * tcfg.grad_accum
        planned = tcfg.epochs * self.iters_per_epoch
        self.total_iters = min(planned, tcfg.max_iters) if tcfg.max_iters > 0 else planned
        self.scheduler = build_scheduler(
            self.optimizer, tcfg, iters_per_epoch=self.iters_per_epoch, total_iters=self.total_iters
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if tcfg.amp == "fp16" else None
        self.ema = self._new_ema() if tcfg.ema else None

    def _new_ema(self) -> ModelEMA:
        return ModelEMA(self.model, decay=self.tcfg.ema_decay, warmup=_EMA_WARMUP)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the loop calls: DDP under torchrun, else ``model`` itself.

        The seam for other parallel layouts (e.g. expert parallelism: experts outside DDP's
        gradient all-reduce, synchronised in :meth:`clip_gradients` instead).
        """
        if not self.info.distributed:
            return model
        # MoE experts without tokens, the DN label table without GT, etc. get no gradient;
        # expert-parallel experts are rank-local and stay out of DDP (engine.expert_parallel)
        return expert_parallel.wrap_ddp(model, device=self.device, find_unused_parameters=True)

    def build_hooks(self) -> list[HookBase]:
        """The default hooks, in call order (see :mod:`damex.engine.hooks`)."""
        tcfg = self.tcfg
        hooks: list[HookBase] = [StopOnSignal()]
        if self.ema is not None:
            hooks.append(EMAUpdate(self.ema))
        hooks += [
            LRScheduleAndBudget(
                self.scheduler, max_iters=tcfg.max_iters, time_budget_s=tcfg.time_budget_min * 60.0
            ),
            MetricsLogger(
                self.run_log,
                log_every=tcfg.log_every,
                total_iters=self.total_iters,
                enabled=self.is_main,
                time_budget_s=tcfg.time_budget_min * 60.0,
            ),
            Evaluation(eval_every=tcfg.eval_every, epochs=tcfg.epochs),
            PeriodicCheckpoint(checkpoint_every=tcfg.checkpoint_every),
        ]
        if self.cfg.uses_moe and self.cfg.moe.loss_schedule != "constant":
            hooks.insert(
                1,
                MoELossSchedule(
                    total_iters=self.total_iters, time_budget_s=tcfg.time_budget_min * 60.0
                ),
            )
        return hooks

    def register_hooks(self, hooks: list[HookBase]) -> None:
        """Append hooks (called in order); each gets a weak reference to this trainer."""
        for h in hooks:
            h.trainer = weakref.proxy(self)
        self.hooks.extend(hooks)

    # -------------------------------------------------------------------------- resume
    def restore(self, st: dict[str, Any]) -> None:
        """Load model, optimizer, scheduler, scaler, EMA, counters, sampler and RNG states."""
        path = self.resume_path
        # checkpoints hold the single-process layout; an expert-parallel rank keeps its experts
        expert_parallel.load_model_state(self.model, st["model"], path=path)
        expert_parallel.load_optimizer_state(self.model, self.optimizer, st["optimizer"], path=path)
        try:
            load_scheduler_state(self.scheduler, st["scheduler"])
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path}: scheduler state: {e}") from e
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None:
            if st.get("ema"):
                expert_parallel.load_ema_state(self.ema, st["ema"])
            else:
                logger.warning("checkpoint %s has no EMA state; EMA restarts from the model", path)
                self.ema = self._new_ema()
        self.state = TrainState.from_dict(st["trainer"])
        self._restore_position(st)
        logger.info(
            "resumed %s: iteration %d, epoch %d (+%d batches), %.0f s trained",
            path,
            self.state.iteration,
            self.state.epoch,
            self.state.epoch_micro,
            self.state.elapsed_s,
        )

    def _restore_position(self, st: dict[str, Any]) -> None:
        """Sampler position and this rank's RNG states (mid-epoch: once the iterator exists)."""
        world = int(st["trainer"].get("world_size", 1))
        rngs = st["rng"]
        rng = rngs[self.info.rank] if self.info.rank < len(rngs) else None
        if world != self.info.world_size:
            logger.warning(
                "checkpoint %s was written by %d processes, now %d: the continuation is not "
                "bit-exact",
                self.resume_path,
                world,
                self.info.world_size,
            )
        if self.state.epoch_micro > 0:
            try:
                self.sampler.load_state_dict(st["sampler"])
            except ValueError as e:
                raise CheckpointError(f"checkpoint {self.resume_path}: {e}") from e
            self._rng_after_iter = rng
        elif rng is not None:
            ckpt.restore_rng_state(rng)

    # --------------------------------------------------------------------- checkpoints
    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved as ``best.pth``: the EMA's, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def training_checkpoint(self) -> dict[str, Any]:
        """Everything an exact resume needs (collective: gathers every rank's RNG states)."""
        rngs = dist_utils.all_gather_object(ckpt.capture_rng_state())
        trainer = self.state.to_dict()
        trainer["world_size"] = self.info.world_size
        trainer["iters_per_epoch"] = self.iters_per_epoch
        if self.state.epoch_micro > 0:
            sampler_state = self.sampler.state_dict()
        else:  # epoch boundary: the next epoch starts from its beginning
            sampler_state = {"epoch": self.state.epoch, "global_batches_consumed": 0}
        return {
            **checkpoint_meta(self.cfg, self.data, self.state),
            # gathered on rank 0 under expert parallelism: the checkpoint does not depend on W
            "model": expert_parallel.gather_model_state(self.model),
            "optimizer": expert_parallel.gather_optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": expert_parallel.gather_ema_state(self.ema) if self.ema is not None else None,
            "sampler": sampler_state,
            "rng": rngs,
            "trainer": trainer,
        }

    def best_checkpoint(self, results: Any) -> dict[str, Any]:
        """``best.pth``: the evaluated weights and their metrics (no optimizer state)."""
        return {
            **checkpoint_meta(self.cfg, self.data, self.state),
            "model": expert_parallel.gather_model_state(self.eval_model),  # collective
            "ema": None,
            "weights": "ema" if self.ema is not None else "model",
            "metrics": results.to_dict() if results is not None else None,
        }

    def save(self, *, epoch_file: bool = False) -> None:
        """Write ``last.pth`` (and ``epoch_XXXX.pth``) on rank 0; collective."""
        state = self.training_checkpoint()
        if self.is_main:
            t0 = time.perf_counter()
            ckpt.save_checkpoint(ckpt.last_path(self.out_dir), state, keep_previous=True)
            if epoch_file:
                ckpt.save_checkpoint(ckpt.epoch_path(self.out_dir, self.state.epoch), state)
            logger.info(
                "checkpoint %s written (iteration %d, %.1f s)",
                ckpt.last_path(self.out_dir),
                self.state.iteration,
                time.perf_counter() - t0,
            )
        dist_utils.barrier()

    # ------------------------------------------------------------------------- the loop
    def run_step(self) -> None:
        """One optimizer step: fetch, forward, loss, backward (per micro-batch), clip, step.

        A non-finite loss or gradient on any rank skips the update (:meth:`_count_skip`).
        """
        accum = self.tcfg.grad_accum
        losses: list[dict[str, float]] = []
        finite = True
        for i in range(accum):
            batch = self._fetch()
            self.state.epoch_micro += 1
            finite &= self._forward_backward(batch, last=i == accum - 1, losses=losses)
        self.state.elapsed_s = self._elapsed()
        (skip,) = self._any_rank(not finite)
        grad_norm = float("nan")
        if not skip:
            grad_norm = self.clip_gradients()
            skip = not self._optimizer_step(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self._count_skip(skip)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.step_info = StepInfo(lr=lr, grad_norm=grad_norm, skipped=skip, losses=losses)
        self.state.iteration += 1

    def _fetch(self) -> Batch:
        """The next micro-batch on the device (a new epoch's iterator on first use)."""
        if self._data_iter is None:
            self.sampler.set_epoch(self.state.epoch)
            self._data_iter = iter(self.loader)
            if self._rng_after_iter is not None:  # mid-epoch resume
                ckpt.restore_rng_state(self._rng_after_iter)
                self._rng_after_iter = None
        try:
            batch = next(self._data_iter)
        except StopIteration:
            raise TrainingError(
                f"the training loader ended after {self.state.epoch_micro} of "
                f"{self.micro_per_epoch} batches of epoch {self.state.epoch}"
            ) from None
        return batch.to(self.device, non_blocking=self.device.type == "cuda")

    def _forward_backward(
        self, batch: Batch, *, last: bool, losses: list[dict[str, float]]
    ) -> bool:
        """Forward, loss and backward of one micro-batch; returns whether the loss is finite.

        The loss terms of a finite micro-batch are appended to ``losses``.
        """
        sync = contextlib.nullcontext()
        if self.info.distributed and not last:
            sync = self.ddp.no_sync()
        with sync:
            with torch.autocast(
                device_type=self.device.type,
                dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ):
                out = self.ddp(batch)
            terms = self.criterion(out, batch)
            loss = terms["loss"]
            finite = bool(torch.isfinite(loss.detach()))
            if finite or self.info.distributed:
                # under DDP every rank must run backward (gradient sync); poisoned gradients are
                # discarded by the skipped step
                scaled = loss / self.tcfg.grad_accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
        if finite:
            losses.append(_loss_scalars(terms))
        return finite

    def clip_gradients(self) -> float:
        """Unscale (fp16), clip at ``train.clip_max_norm``; returns the total norm before."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.tcfg.clip_max_norm if self.tcfg.clip_max_norm > 0 else math.inf
        # expert parallelism: expert grads / W, then the global norm over every rank's experts
        expert_parallel.finish_expert_grads_(self.model)
        return float(expert_parallel.clip_grad_norm_(self.model, self._params, max_norm))

    def _optimizer_step(self, grad_norm: float) -> bool:
        """Apply the gradients; returns False when the step was skipped (non-finite norm)."""
        if self.scaler is not None:
            # fp16: the scaler skips inf/NaN gradients itself and lowers the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return True
        if math.isfinite(grad_norm):
            self.optimizer.step()
            return True
        return False

    def _count_skip(self, skipped: bool) -> None:
        """Count skipped steps; ``train.max_nonfinite`` in a row raise :class:`TrainingError`."""
        st = self.state
        if not skipped:
            st.nonfinite_consecutive = 0
            return
        st.nonfinite_total += 1
        st.nonfinite_consecutive += 1
        logger.warning(
            "step %d: non-finite loss or gradient, step skipped (%d in a row, %d in total)",
            st.iteration + 1,
            st.nonfinite_consecutive,
            st.nonfinite_total,
        )
        if st.nonfinite_consecutive >= self.tcfg.max_nonfinite:
            kept = ckpt.last_path(self.out_dir)
            raise TrainingError(
                f"{st.nonfinite_consecutive} consecutive non-finite losses/gradients up to "
                f"step {st.iteration + 1} (train.max_nonfinite={self.tcfg.max_nonfinite}); "
                f"stopping. The last good checkpoint "
                f"{kept if kept.exists() else '(none written yet)'} is kept. Lower "
                "train.lr, raise train.warmup_iters, check the data, or use train.amp=none."
            )

    def _any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over ranks (collective under torchrun)."""
        if not self.info.distributed:
            return flags
        t = dist_utils.all_reduce_sum(torch.tensor([float(f) for f in flags]))
        return tuple(bool(v > 0) for v in t)

    def _elapsed(self) -> float:
        return self._elapsed0 + time.perf_counter() - self._loop_t0

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (hooks; the ranks agree on it)."""
        if reason not in _STOP_REASONS:
            raise ValueError(f"stop reason must be one of {_STOP_REASONS}, got {reason!r}")
        self._stop_requests.add(reason)

    def _agreed_stop(self) -> str | None:
        """The stop reason of highest priority requested on any rank (None: go on)."""
        wanted = self._any_rank(*(r in self._stop_requests for r in _STOP_REASONS))
        return next((r for r, w in zip(_STOP_REASONS, wanted, strict=True) if w), None)

    def _call(self, method: str) -> None:
        for h in self.hooks:
            getattr(h, method)()

    def fit(self) -> TrainResult:
        """Run the hooks and steps until the planned epochs are done or a stop is agreed."""
        st = self.state
        self._loop_t0, self._elapsed0 = time.perf_counter(), st.elapsed_s
        self.ddp.train()
        self.criterion.train()
        try:
            self._call("before_train")
            while st.epoch < self.tcfg.epochs and self.stop_reason is None:
                self._call("before_step")
                self.run_step()
                self._call("after_step")
                self.stop_reason = self._agreed_stop()
                if st.epoch_micro >= self.micro_per_epoch:
                    st.epoch, st.epoch_micro = st.epoch + 1, 0
                    self._data_iter = None
                    self._call("after_epoch")
            self._data_iter = None
            st.elapsed_s = self._elapsed()
            self._call("after_train")
        finally:
            for h in reversed(self.hooks):
                h.close()
            self.run_log.close()
        return self._result()

    def _result(self) -> TrainResult:
        evaluation = next((h for h in self.hooks if isinstance(h, Evaluation)), None)
        best = ckpt.best_path(self.out_dir)
        return TrainResult(
            output_dir=self.out_dir,
            checkpoint=ckpt.last_path(self.out_dir),
            best_checkpoint=best if best.exists() else None,
            iterations=self.state.iteration,
            epochs=self.state.epoch,
            stop_reason=self.stop_reason or "completed",
            nonfinite_steps=self.state.nonfinite_total,
            elapsed_s=self.state.elapsed_s,
            best_mean_ap=self.state.best_mean_ap,
            best_per_dataset=self.state.best_per_dataset,
            final_results=evaluation.final_results if evaluation else None,
            final_routing=evaluation.last_routing if evaluation else None,
            is_main_process=self.is_main,
        )


_Trainer = Trainer  # the name tests/engine/test_train_distributed.py drives


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
    cfg = resolve_auto_expert_map(cfg)  # moe.expert_map: auto -> a map from the data
    resume_path = resolve_resume(cfg, resume)
    owns_group = not dist_utils.is_distributed()
    trainer = Trainer(cfg, resume_path)
    try:
        trainer.setup()
        return trainer.fit()
    finally:
        if owns_group:
            dist_utils.cleanup()
