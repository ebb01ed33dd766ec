"""Training engine: optimizer and schedules, checkpoints, distributed helpers, EMA, logging,
the training loop, inference and the report drivers.

Heavy modules are imported on first attribute access (``from damex.engine import train``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "train",
    "evaluate",
    "TrainResult",
    "TrainingError",
    "run_inference",
    "evaluate_checkpoint",
    "visualize_routing",
    "run_demo",
    "save_checkpoint",
    "load_checkpoint",
    "build_optimizer",
    "build_scheduler",
    "LRScheduler",
    "ModelEMA",
    "init_distributed",
]

_LAZY = {
    "train": "damex.engine.trainer",
    "evaluate": "damex.engine.loading",
    "TrainResult": "damex.engine.trainer",
    "TrainingError": "damex.engine.trainer",
    "run_inference": "damex.engine.inference",
    "evaluate_checkpoint": "damex.engine.report",
    "visualize_routing": "damex.engine.report",
    "run_demo": "damex.engine.report",
    "save_checkpoint": "damex.engine.checkpoint",
    "load_checkpoint": "damex.engine.checkpoint",
    "build_optimizer": "damex.engine.optim",
    "build_scheduler": "damex.engine.optim",
    "LRScheduler": "damex.engine.optim",
    "ModelEMA": "damex.engine.ema",
    "init_distributed": "damex.engine.distributed",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'damex.engine' has no attribute {name!r}")
