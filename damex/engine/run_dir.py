"""The run directory of a training: which checkpoint to resume, whether the folder may be used,
what changed in the config since the checkpoint.

Every function here is collective-safe: decisions that touch the file system are taken on rank 0
and broadcast, so all ranks raise the same error.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from damex.config import Config
from damex.engine import checkpoint as ckpt
from damex.engine import distributed as dist_utils
from damex.errors import CheckpointError, ConfigError

__all__ = [
    "RUN_FILES",
    "RESUME_KEYS",
    "resolve_resume",
    "load_resume_checkpoint",
    "prepare_output_dir",
    "diff_config",
]

logger = logging.getLogger(__name__)

RUN_FILES = ("last.pth", "last.prev.pth", "best.pth", "metrics.jsonl", "config.yaml")
# what an exact resume reads from a checkpoint
RESUME_KEYS = (
    "model", "optimizer", "scheduler", "sampler", "rng", "trainer", "label_space", "config",
)  # fmt: skip


def resolve_resume(cfg: Config, resume: str | bool | None) -> Path | None:
    """The checkpoint to resume from: None (new run), ``output.dir/last.pth`` or a given path.

    Args:
        cfg: the run config (``output.dir``).
        resume: False / None / "" for a new run; True or ``"auto"`` for ``last.pth``; a path.

    Raises:
        CheckpointError: the checkpoint does not exist.
    """
    if resume is False or resume is None or resume == "":
        return None
    if resume is True or resume == "auto":
        path = ckpt.last_path(cfg.output.dir)
    else:
        path = Path(str(resume))
    if not path.is_file():
        if not ckpt.previous_path(path).is_file():  # else load_resume_checkpoint falls back
            raise CheckpointError(f"cannot resume: checkpoint {path} does not exist")
    return path


def load_resume_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint for an exact resume and warn about config keys that changed since.

    Args:
        path: from :func:`resolve_resume`.
        config: the new run's config as a plain dict (``config_to_dict``).

    A missing, truncated or damaged ``path`` (or one without a resume key) falls back to the
    previous good checkpoint beside it (``last.prev.pth``), with a warning naming both.

    Raises:
        CheckpointError: unreadable, corrupt, or missing one of :data:`RESUME_KEYS`, and no
            usable previous checkpoint either.
    """
    state, path = ckpt.load_checkpoint_with_fallback(path, required_keys=RESUME_KEYS)
    changed = diff_config(state["config"], config)
    if changed:
        logger.warning("resuming %s with a changed config: %s", path, "; ".join(changed))
    return state


def prepare_output_dir(cfg: Config, resuming: bool) -> Path:
    """Create the run directory; refuse to clobber another run (decided on rank 0).

    A folder that holds a run (``last.pth``, ``best.pth``, ``metrics.jsonl``, ``config.yaml`` or
    ``epoch_*.pth``) is an error unless resuming or ``output.overwrite`` (which removes those
    files and the ``tb`` / ``eval`` folders).

    Raises:
        ConfigError: the folder holds another run.
    """
    out = Path(cfg.output.dir)
    err = None
    if dist_utils.is_main_process():
        existing = [f for f in RUN_FILES if (out / f).exists()]
        existing += sorted(p.name for p in out.glob("epoch_*.pth"))
        if existing and not resuming and not cfg.output.overwrite:
            err = (
                f"output.dir {out} already holds a run ({', '.join(existing[:4])}); resume it "
                "(--resume), choose another output.dir, or set output.overwrite=true"
            )
        elif existing and not resuming:
            _remove_run(out, existing)
        if err is None:
            out.mkdir(parents=True, exist_ok=True)
    err = dist_utils.broadcast_object(err)
    if err:
        raise ConfigError(err)
    dist_utils.barrier()
    return out


def _remove_run(out: Path, files: list[str]) -> None:
    logger.warning("output.overwrite: removing the previous run's files in %s", out)
    for f in files:
        (out / f).unlink(missing_ok=True)
    for d in ("tb", "eval"):
        if (out / d).is_dir():
            shutil.rmtree(out / d)


def diff_config(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"a.b: old -> new"`` for every leaf that differs between two nested dicts (sorted)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_config(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
