"""Checkpoints: atomic save, ``weights_only`` loading, RNG capture, clear errors.

A checkpoint is a plain dict of tensors and Python containers (dict / list / tuple of str, int,
float, bool, None, tensors), so it loads with ``torch.load(weights_only=True)`` (no arbitrary
code runs on load). :func:`save_checkpoint` checks that before writing anything and names the
offending key; the write goes to a temporary file in the same directory, is fsync'ed, then
``os.replace``'d over the target, so a crash or a failed write never leaves a partial file and
the previous checkpoint survives.

Run layout (``checkpoint_paths``): ``last.pth`` (every epoch and at the end), ``best.pth`` (best
mean AP), ``epoch_XXXX.pth`` (every ``train.checkpoint_every`` epochs), ``last.prev.pth`` (the
``last.pth`` before the latest one, kept by ``save_checkpoint(..., keep_previous=True)``).

Torch checkpoints are zip archives with a CRC per entry; :func:`load_checkpoint` checks every
CRC first, because ``torch.load`` itself accepts a file whose tensor bytes were damaged and
returns wrong weights without a word. A truncated or damaged file is a :class:`CheckpointError`
naming it; :func:`load_checkpoint_with_fallback` then reads ``last.prev.pth`` instead.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from damex.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "load_checkpoint_with_fallback",
    "verify_checkpoint_file",
    "previous_path",
    "check_plain",
    "require_keys",
    "load_model_state",
    "last_path",
    "best_path",
    "epoch_path",
    "capture_rng_state",
    "restore_rng_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_SCALARS = (str, int, float, bool, type(None))


def last_path(output_dir: str | os.PathLike[str]) -> Path:
    """``<output_dir>/last.pth``."""
    return Path(output_dir) / "last.pth"


def best_path(output_dir: str | os.PathLike[str]) -> Path:
    """``<output_dir>/best.pth`` (best mean AP)."""
    return Path(output_dir) / "best.pth"


def epoch_path(output_dir: str | os.PathLike[str], epoch: int) -> Path:
    """``<output_dir>/epoch_XXXX.pth`` for a 1-based completed epoch count."""
    return Path(output_dir) / f"epoch_{epoch:04d}.pth"


def previous_path(path: str | os.PathLike[str]) -> Path:
    """The previous good checkpoint kept beside ``path``: ``last.pth`` -> ``last.prev.pth``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def check_plain(obj: Any, key: str = "<root>") -> None:
    """Raise ``CheckpointError`` if ``obj`` would not load with ``weights_only=True``.

    Allowed: tensors, ``torch.Size``, ``torch.dtype``, str / int / float / bool / None, and
    dict / list / tuple of those (dict keys: str or int).

    Args:
        obj: the value to check.
        key: its path, used in the message (e.g. ``state['optimizer']['state'][3]``).
    """
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and not isinstance(obj, nn.Parameter):
            raise CheckpointError(
                f"checkpoint value {key} is a tensor subclass {type(obj).__name__}; store a plain "
                "torch.Tensor"
            )
        return
    if isinstance(obj, _SCALARS) or isinstance(obj, (torch.Size, torch.dtype)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(
                    f"checkpoint key {k!r} under {key} has type {type(k).__name__}; expected str "
                    "or int"
                )
            check_plain(v, f"{key}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{key}[{i}]")
        return
    raise CheckpointError(
        f"checkpoint value {key} has type {type(obj).__module__}.{type(obj).__qualname__}; only "
        "tensors and plain Python containers/scalars load with weights_only=True (store a config "
        "as a dict or YAML string, a numpy array as a tensor)"
    )


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rotate_previous(path: Path) -> None:
    """Keep the checkpoint now at ``path`` as :func:`previous_path` (atomically, by hard link).

    ``path`` itself stays in place (the new checkpoint replaces it afterwards), so at every
    moment both names hold a complete file. A ``path`` that fails its CRC check is not kept:
    the previous good one stays.
    """
    prev = previous_path(path)
    try:
        verify_checkpoint_file(path)
    except CheckpointError as e:
        logger.warning("not keeping %s as %s: %s", path, prev.name, e)
        return
    fd, tmp_name = tempfile.mkstemp(prefix=f".{prev.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:  # no hard links on this file system
            shutil.copyfile(path, tmp)
        os.replace(tmp, prev)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_tmp(path: Path) -> None:
    """Remove temporary files of ``path`` (and of its previous copy) left by a killed writer."""
    for name in (path.name, previous_path(path).name):
        for stale in path.parent.glob(f".{name}.*.tmp"):
            logger.info("removing %s, left by an interrupted checkpoint write", stale)
            stale.unlink(missing_ok=True)


class _ErrorRecordingWriter:
    """Passes writes to a file and keeps the ``OSError`` of a failed one (e.g. ENOSPC)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()


def save_checkpoint(
    path: str | os.PathLike[str], state: Mapping[str, Any], *, keep_previous: bool = False
) -> Path:
    """Atomically write ``state`` to ``path`` (tmp file in the same dir, fsync, ``os.replace``).

    Args:
        path: destination file; its directory is created if missing.
        state: a mapping of plain values (see :func:`check_plain`).
        keep_previous: once the new file is written completely, keep the checkpoint it
            replaces as :func:`previous_path` (``last.prev.pth``), the fallback of
            :func:`load_checkpoint_with_fallback`.

    Returns:
        The destination path.

    Raises:
        CheckpointError: naming the key of an unsupported value (nothing is written), or the
            file when the write fails (the temporary file is removed, an existing ``path`` is
            left untouched).
    """
    path = Path(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path}: state must be a mapping, got {type(state)}")
    check_plain(state, "state")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e}") from e
    tmp = Path(tmp_name)
    writer: _ErrorRecordingWriter | None = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _ErrorRecordingWriter(f)
            torch.save(dict(state), writer)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            _rotate_previous(path)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):
            # torch.save reports a failed write as "unexpected pos ..."; name the OS error
            cause = writer.error if writer is not None and writer.error is not None else e
            raise CheckpointError(
                f"cannot write checkpoint {path}: {cause} (the previous {path.name}, if any, is "
                "unchanged)"
            ) from e
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    required_keys: Iterable[str] = (),
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Args:
        path: the ``.pth`` file.
        map_location: where tensors go.
        required_keys: top-level keys that must be present.

    Raises:
        CheckpointError: the file is missing, unreadable/corrupt, holds non-plain objects, is
            not a dict, or lacks a required key (all missing keys are listed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    verify_checkpoint_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"an object of type {found.group(1)}" if found else "a non-tensor object"
        raise CheckpointError(
            f"checkpoint {path} holds {what}; only tensors and plain containers load with "
            "weights_only=True (its code is not run: a checkpoint written by damex never holds "
            "one)"
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"cannot load checkpoint {path} (corrupt, truncated or not a weights_only "
            f"checkpoint): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds {type(state).__name__}, expected a dict")
    require_keys(state, required_keys, path=path)
    return state


def verify_checkpoint_file(path: str | os.PathLike[str]) -> None:
    """Check a checkpoint file's integrity: its zip index and every entry's CRC-32.

    Legacy (non-zip, pickle) checkpoints are left to ``torch.load``.

    Raises:
        CheckpointError: truncated (no zip index), damaged (an entry fails its CRC) or
            unreadable; the message names the file and its size.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes); expected a torch .pth")
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x80\x02":  # legacy pickle-based torch.save format
            return
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a torch checkpoint ({size} bytes, no "
                "complete zip index); expected a file written by torch.save"
            ) from None
        with zf:
            bad = zf.testzip()
    except zipfile.BadZipFile as e:  # a damaged entry header
        raise CheckpointError(f"checkpoint {path} is corrupt ({size} bytes): {e}") from None
    except (OSError, EOFError, ValueError) as e:  # zlib / struct errors on a damaged index
        raise CheckpointError(f"checkpoint {path} is unreadable ({size} bytes): {e}") from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: entry {bad!r} fails its CRC check ({size} bytes)"
        )


def load_checkpoint_with_fallback(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    required_keys: Iterable[str] = (),
) -> tuple[dict[str, Any], Path]:
    """:func:`load_checkpoint`, falling back to :func:`previous_path` when ``path`` is unusable.

    ``path`` missing, truncated, corrupt or lacking a required key: the previous good checkpoint
    (``last.prev.pth``) is loaded instead, with a warning that names both files.

    Returns:
        The state and the file it came from.

    Raises:
        CheckpointError: ``path`` is unusable and there is no usable previous checkpoint (the
            message gives both reasons).
    """
    path = Path(path)
    prev = previous_path(path)
    try:
        return load_checkpoint(path, map_location=map_location, required_keys=required_keys), path
    except CheckpointError as e:
        if not prev.is_file():
            raise CheckpointError(f"{e} (and there is no previous checkpoint {prev})") from None
        first = e
    try:
        state = load_checkpoint(prev, map_location=map_location, required_keys=required_keys)
    except CheckpointError as e:
        raise CheckpointError(f"{first}; the previous checkpoint is unusable too: {e}") from None
    logger.warning("%s; falling back to the previous good checkpoint %s", first, prev)
    return state, prev


def require_keys(
    state: Mapping[str, Any], keys: Iterable[str], *, path: str | os.PathLike[str]
) -> None:
    """Raise ``CheckpointError`` listing every key of ``keys`` missing from ``state``."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks keys {missing}; it has {sorted(map(str, state))}"
        )


def load_model_state(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    path: str | os.PathLike[str],
    strict: bool = True,
) -> None:
    """Load ``state_dict`` into ``model`` with an error that lists every mismatch.

    Strips a ``module.`` prefix (DDP) when present.

    Args:
        model: the unwrapped module.
        state_dict: parameters and buffers.
        path: the checkpoint file, for messages.
        strict: require the same keys (shapes must always match).

    Raises:
        CheckpointError: missing / unexpected keys (strict) or shape mismatches, all listed.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = []
    if shape:
        problems.append(f"shape mismatches {shape}")
    if strict and missing:
        problems.append(f"missing keys {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match the model (is the config the one it was trained "
            f"with?): {'; '.join(problems)}"
        )
    if missing or unexpected:
        logger.warning(
            "checkpoint %s: %d missing, %d unexpected keys (non-strict load)",
            path,
            len(missing),
            len(unexpected),
        )
    model.load_state_dict(dict(state_dict), strict=strict)


def capture_rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and python global RNG states as tensors / ints."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].cpu().numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    p = state["python"]
    random.setstate(
        (int(p["version"]), tuple(int(x) for x in p["state"].tolist()), p["gauss_next"])
    )
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu().to(torch.uint8) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint has %d CUDA RNG states, %d devices visible; CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )
