"""The tiny training run of the fault suite (and of the checkpoint rows of test_bad_inputs)."""

from __future__ import annotations

import errno
import io
import os
import sys
from pathlib import Path
from typing import Any

# 5 epochs of 1 optimizer step (data.epoch_size 2, batch 2): last.pth is rewritten after every
# step, so a kill can land before, during or after any checkpoint write.
FAULT_EPOCHS = 5


def fault_config_dict(synthetic_root: Path, out_dir: Path, **train: Any) -> dict[str, Any]:
    """The engine tests' tiny config (``tests/engine/engine_fixtures.py``), 1 step per epoch."""
    engine_tests = str(Path(__file__).resolve().parents[1] / "engine")
    if engine_tests not in sys.path:
        sys.path.append(engine_tests)
    from engine_fixtures import tiny_config_dict

    cfg = tiny_config_dict(synthetic_root, out_dir, **{"epochs": FAULT_EPOCHS, **train})
    cfg["data"]["epoch_size"] = 2
    cfg["eval"]["max_images"] = 2
    return cfg


class DiskFullFile(io.FileIO):
    """A real file whose writes fail with ENOSPC once ``budget`` bytes are on disk."""

    def __init__(self, fd: int, budget: int) -> None:
        super().__init__(fd, "wb", closefd=True)
        self.budget = budget

    def write(self, b: Any) -> int:  # type: ignore[override]
        n = len(memoryview(b))
        if n > self.budget:
            super().write(bytes(memoryview(b)[: self.budget]))
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= n
        return super().write(b)
