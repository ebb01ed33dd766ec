"""Exponential moving average of model weights.

``ema = d_t * ema + (1 - d_t) * model`` after every optimizer step, over every floating-point
parameter and buffer (integer buffers are copied). The decay ramps up as
``d_t = decay * (1 - exp(-t / warmup))`` (t = updates so far, 1-based), the ramp of YOLOv5 /
timm ``ModelEmaV2`` users, so early averages are not dominated by the random init; ``warmup=0``
uses ``decay`` from the first update.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or itself)."""
    return (
        model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    )


class ModelEMA:
    """A frozen copy of a model that tracks the EMA of its weights.

    Args:
        model: the model to track (a DDP wrapper is unwrapped).
        decay: asymptotic decay (``train.ema_decay``).
        warmup: e-folding length of the decay ramp, in updates (0 = no ramp).
        device: where the EMA copy lives (default: the model's device).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float = 0.9997,
        warmup: int = 2000,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup < 0:
            raise ValueError(f"EMA warmup must be >= 0, got {warmup}")
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        if device is not None:
            self.module.to(device)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = int(warmup)
        self.updates = 0

    def current_decay(self, updates: int | None = None) -> float:
        """``d_t`` for the ``updates``-th update (default: the last one done)."""
        t = self.updates if updates is None else updates
        if self.warmup == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-t / self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into the average (call after optimizer.step)."""
        self.updates += 1
        d = self.current_decay()
        src = unwrap_model(model).state_dict()
        for name, ema_v in self.module.state_dict().items():
            v = src[name].detach().to(ema_v.device)
            if ema_v.is_floating_point():
                ema_v.mul_(d).add_(v.to(ema_v.dtype), alpha=1.0 - d)
            else:
                ema_v.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "updates": self.updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state.get("decay", self.decay))
        self.warmup = int(state.get("warmup", self.warmup))
