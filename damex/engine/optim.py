"""Optimizer parameter groups and learning-rate schedules (spec §2.1 optimizer row, §4.6).

Parameter groups follow DINO (``param_dict_type='default'`` plus the Deformable-DETR
``lr_linear_proj_mult`` option):

* ``backbone``: parameters whose name has a ``backbone`` component, at ``lr_backbone``;
* ``linear_proj``: parameters whose name contains ``sampling_offsets`` or ``reference_points``
  (the deformable-attention offset / reference projections), at ``lr * lr_linear_proj_mult``;
* ``default``: everything else, at ``lr``.

Weight decay: DINO applies ``weight_decay`` to *every* parameter, norms, biases and embeddings
included; that is the default here. ``no_decay_norm_bias=True`` moves 1-d parameters (norm
weights, biases) and embedding tables into ``*_no_decay`` twin groups with decay 0.

Schedules (``TrainConfig.schedule``), all per optimizer step and all multiplied by a linear
warmup ramp ``w(i) = min(1, (i + 1) / warmup_iters)`` (detectron2's ``WarmupParamScheduler``
convention: the ramp multiplies the scheduled value):

* ``step``: ``gamma ** (epoch // lr_drop)``. With the official ``lr_drop=11`` and 36 epochs this
  decays at epochs 11, 22 and 33 (spec Q8), which is reproduced on purpose.
* ``multistep``: ``gamma ** |{m in milestones : m <= epoch}|``.
* ``cosine``: ``0.5 * (1 + cos(pi * i / total_iters))`` (floored at ``min_lr_ratio``).
* ``time_cosine``: the same cosine over the wall-clock budget, ``progress = elapsed_s /
  time_budget_s``; the caller passes the elapsed training seconds (checkpointed for resume).

``epoch = i // iters_per_epoch`` where ``i`` counts optimizer steps from 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from damex.config import Schedule, TrainConfig, choices

__all__ = [
    "SCHEDULES",
    "LINEAR_PROJ_KEYWORDS",
    "build_param_groups",
    "build_optimizer",
    "LRScheduler",
    "build_scheduler",
]

logger = logging.getLogger(__name__)

SCHEDULES = choices(Schedule)
LINEAR_PROJ_KEYWORDS = ("sampling_offsets", "reference_points")


def _is_backbone(name: str) -> bool:
    return "backbone" in name.split(".")


def _is_linear_proj(name: str) -> bool:
    return any(k in name for k in LINEAR_PROJ_KEYWORDS)


def _is_no_decay(name: str, param: nn.Parameter, embedding_names: set[str]) -> bool:
    return param.ndim <= 1 or name in embedding_names


def build_param_groups(
    model: nn.Module,
    *,
    lr: float,
    lr_backbone: float,
    lr_linear_proj_mult: float = 1.0,
    weight_decay: float = 1e-4,
    no_decay_norm_bias: bool = False,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into named AdamW groups.

    Args:
        model: the detector (unwrapped or DDP-wrapped; the ``module.`` prefix is ignored).
        lr: learning rate of the default group.
        lr_backbone: learning rate of the backbone group (0 freezes nothing by itself; frozen
            parameters are those with ``requires_grad=False``, which are skipped).
        lr_linear_proj_mult: multiplier of ``lr`` for ``sampling_offsets`` / ``reference_points``.
        weight_decay: decoupled weight decay.
        no_decay_norm_bias: put 1-d params and ``nn.Embedding`` weights in decay-0 groups.

    Returns:
        Non-empty groups, each a dict with ``params``, ``lr``, ``weight_decay``, ``name`` and
        ``initial_lr`` (the schedule's base value).
    """
    embedding_names: set[str] = set()
    if no_decay_norm_bias:
        for mod_name, mod in model.named_modules():
            if isinstance(mod, nn.Embedding):
                embedding_names.add(f"{mod_name}.weight" if mod_name else "weight")
    buckets: dict[str, list[nn.Parameter]] = {}
    group_lr = {
        "backbone": lr_backbone,
        "linear_proj": lr * lr_linear_proj_mult,
        "default": lr,
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_backbone(name):
            key = "backbone"
        elif _is_linear_proj(name):
            key = "linear_proj"
        else:
            key = "default"
        if no_decay_norm_bias and _is_no_decay(name, param, embedding_names):
            key += "_no_decay"
        buckets.setdefault(key, []).append(param)
    groups = []
    for key in (
        "default",
        "default_no_decay",
        "backbone",
        "backbone_no_decay",
        "linear_proj",
        "linear_proj_no_decay",
    ):
        if key not in buckets:
            continue
        base = key.removesuffix("_no_decay")
        groups.append(
            {
                "params": buckets[key],
                "lr": group_lr[base],
                "initial_lr": group_lr[base],
                "weight_decay": 0.0 if key.endswith("_no_decay") else weight_decay,
                "name": key,
            }
        )
    if not groups:
        raise ValueError("build_param_groups: the model has no trainable parameters")
    return groups


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, *, no_decay_norm_bias: bool = False
) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups` with the values of ``cfg`` (spec §2.1).

    Args:
        model: the detector.
        cfg: the ``train`` section (``lr``, ``lr_backbone``, ``lr_linear_proj_mult``,
            ``weight_decay``).
        no_decay_norm_bias: see :func:`build_param_groups` (default False = DINO).
    """
    groups = build_param_groups(
        model,
        lr=cfg.lr,
        lr_backbone=cfg.lr_backbone,
        lr_linear_proj_mult=cfg.lr_linear_proj_mult,
        weight_decay=cfg.weight_decay,
        no_decay_norm_bias=no_decay_norm_bias,
    )
    for g in groups:
        logger.info(
            "param group %s: %d tensors, %d params, lr %.3g, wd %.3g",
            g["name"],
            len(g["params"]),
            sum(p.numel() for p in g["params"]),
            g["lr"],
            g["weight_decay"],
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class _ScheduleSpec:
    schedule: str
    iters_per_epoch: int
    total_iters: int
    lr_drop: int
    milestones: tuple[int, ...]
    gamma: float
    warmup_iters: int
    time_budget_s: float
    min_lr_ratio: float


class LRScheduler:
    """Per-optimizer-step learning-rate scheduler with a closed-form factor.

    The lr of group g at step ``i`` is ``initial_lr[g] * factor(i, elapsed_s)``. Call
    :meth:`step` after every optimizer step; it advances the counter and writes the lr of the
    next step into the optimizer. The constructor writes the lr of step 0.

    Args:
        optimizer: groups must carry ``initial_lr`` (set by :func:`build_param_groups`; else the
            current ``lr`` is taken).
        schedule: one of ``step``, ``multistep``, ``cosine``, ``time_cosine``.
        iters_per_epoch: optimizer steps per epoch (step / multistep).
        total_iters: total optimizer steps (cosine).
        lr_drop: step period in epochs (step).
        milestones: epochs where multistep decays.
        gamma: decay factor (step / multistep).
        warmup_iters: length of the linear warmup ramp, 0 for none.
        time_budget_s: wall-clock budget in seconds (time_cosine).
        min_lr_ratio: floor of the cosine factor.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        schedule: str,
        iters_per_epoch: int = 1,
        total_iters: int = 0,
        lr_drop: int = 0,
        milestones: Iterable[int] = (),
        gamma: float = 0.1,
        warmup_iters: int = 0,
        time_budget_s: float = 0.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {schedule!r}")
        if iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
        if schedule == "step" and lr_drop < 1:
            raise ValueError(f"train.lr_drop must be >= 1 for the step schedule, got {lr_drop}")
        if schedule == "cosine" and total_iters < 1:
            raise ValueError(f"cosine schedule needs total_iters >= 1, got {total_iters}")
        if schedule == "time_cosine" and time_budget_s <= 0:
            raise ValueError(
                "time_cosine schedule needs train.time_budget_min > 0, "
                f"got {time_budget_s / 60.0} min"
            )
        if warmup_iters < 0:
            raise ValueError(f"train.warmup_iters must be >= 0, got {warmup_iters}")
        self.optimizer = optimizer
        self.spec = _ScheduleSpec(
            schedule=schedule,
            iters_per_epoch=int(iters_per_epoch),
            total_iters=int(total_iters),
            lr_drop=int(lr_drop),
            milestones=tuple(sorted(int(m) for m in milestones)),
            gamma=float(gamma),
            warmup_iters=int(warmup_iters),
            time_budget_s=float(time_budget_s),
            min_lr_ratio=float(min_lr_ratio),
        )
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        self.iteration = 0
        self.elapsed_s = 0.0
        self._apply()

    def factor(self, iteration: int, elapsed_s: float = 0.0) -> float:
        """The lr multiplier at optimizer step ``iteration`` (0-based) and ``elapsed_s``."""
        s = self.spec
        if s.warmup_iters > 0:
            warm = min(1.0, (iteration + 1) / s.warmup_iters)
        else:
            warm = 1.0
        epoch = iteration // s.iters_per_epoch
        if s.schedule == "step":
            decay = s.gamma ** (epoch // s.lr_drop)
        elif s.schedule == "multistep":
            decay = s.gamma ** sum(1 for m in s.milestones if m <= epoch)
        else:
            if s.schedule == "cosine":
                progress = iteration / s.total_iters
            else:
                progress = elapsed_s / s.time_budget_s
            progress = min(max(progress, 0.0), 1.0)
            cos = 0.5 * (1.0 + math.cos(math.pi * progress))
            decay = s.min_lr_ratio + (1.0 - s.min_lr_ratio) * cos
        return warm * decay

    def _apply(self) -> None:
        f = self.factor(self.iteration, self.elapsed_s)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f

    def step(self, elapsed_s: float | None = None) -> None:
        """Advance one optimizer step and set the lr of the next one.

        Args:
            elapsed_s: training seconds so far (required to move ``time_cosine``).
        """
        self.iteration += 1
        if elapsed_s is not None:
            self.elapsed_s = float(elapsed_s)
        self._apply()

    def set_elapsed(self, elapsed_s: float) -> None:
        """Update the elapsed time without stepping (time_cosine lr follows the clock)."""
        self.elapsed_s = float(elapsed_s)
        self._apply()

    def get_last_lr(self) -> list[float]:
        """Current lr of every group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "elapsed_s": self.elapsed_s,
            "base_lrs": list(self.base_lrs),
            "schedule": self.spec.schedule,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("schedule", self.spec.schedule) != self.spec.schedule:
            logger.warning(
                "scheduler: checkpoint used schedule %r, continuing with %r",
                state["schedule"],
                self.spec.schedule,
            )
        base = [float(x) for x in state.get("base_lrs", self.base_lrs)]
        if len(base) != len(self.base_lrs):
            raise ValueError(
                f"scheduler state has {len(base)} param groups, optimizer has {len(self.base_lrs)}"
            )
        if any(abs(b - c) > 1e-12 * max(abs(c), 1e-30) for b, c in zip(base, self.base_lrs)):
            logger.warning(
                "scheduler: resuming with the checkpoint's learning rates %s; the config's %s "
                "are ignored (exact resume)",
                base,
                self.base_lrs,
            )
        self.base_lrs = base
        self.iteration = int(state["iteration"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self._apply()


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    *,
    iters_per_epoch: int,
    total_iters: int,
) -> LRScheduler:
    """The :class:`LRScheduler` described by ``cfg``.

    Args:
        optimizer: from :func:`build_optimizer`.
        cfg: the ``train`` section.
        iters_per_epoch: optimizer steps per epoch (loader length // ``grad_accum``).
        total_iters: planned optimizer steps (``epochs * iters_per_epoch``, capped by
            ``max_iters``).
    """
    return LRScheduler(
        optimizer,
        schedule=cfg.schedule,
        iters_per_epoch=iters_per_epoch,
        total_iters=total_iters,
        lr_drop=cfg.lr_drop,
        milestones=cfg.milestones,
        gamma=cfg.gamma,
        warmup_iters=cfg.warmup_iters,
        time_budget_s=cfg.time_budget_min * 60.0,
    )
