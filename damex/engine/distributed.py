"""``torch.distributed`` set-up from the ``torchrun`` environment, and small collective helpers.

``torchrun --nproc_per_node N ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and initializes the
default process group (NCCL when the device is CUDA, gloo otherwise). Without them (or with
``WORLD_SIZE=1``) everything runs in one process and the helpers below are no-ops.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_reduce_mean",
    "all_reduce_sum",
    "reduce_dict_mean",
    "all_gather_object",
    "broadcast_object",
    "resolve_device",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """The process's place in the job.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: the device this process computes on.
        backend: ``nccl``, ``gloo`` or ``""`` when not distributed.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from e


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<i>`` (``train.device``).
        local_rank: GPU index used for ``auto`` / ``cuda``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but CUDA is not available")
        return torch.device("cuda", local_rank)
    if device.startswith("cuda:") or device == "cpu":
        return torch.device(device)
    raise ValueError(f"train.device must be auto, cpu, cuda or cuda:<i>, got {device!r}")


def init_distributed(device: str = "auto", *, timeout_min: float = 30.0) -> DistInfo:
    """Initialize the default process group from the ``torchrun`` environment.

    Idempotent: when the group already exists, returns the current info.

    Args:
        device: ``train.device`` (``auto``/``cpu``/``cuda``).
        timeout_min: collective timeout.

    Returns:
        A :class:`DistInfo`. On CUDA the current device is set to ``cuda:LOCAL_RANK``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size > 1 and not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())
    if world_size <= 1:
        return DistInfo(0, 1, local_rank, dev, "")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(
                f"WORLD_SIZE={world_size} but {var} is not set; launch with torchrun "
                "(python -m torch.distributed.run --nproc_per_node N ...)"
            )
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=timeout_min),
        **kwargs,
    )
    logger.info("distributed: rank %d/%d, backend %s, device %s", rank, world_size, backend, dev)
    return DistInfo(rank, world_size, local_rank, dev, backend)


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a default process group is initialized (any world size)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Synchronize all processes (no-op without a process group)."""
    if is_distributed() and get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _collective_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor | float) -> torch.Tensor:
    """Sum over processes. Returns a new tensor on the input's device (float input -> cpu)."""
    t = torch.as_tensor(value, dtype=torch.float64 if isinstance(value, float) else None)
    if get_world_size() == 1:
        return t.clone()
    out = t.detach().to(_collective_device()).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor:
    """Mean over processes (floating point). No-op copy in a single process."""
    t = torch.as_tensor(value)
    if not t.is_floating_point():
        t = t.double()
    return all_reduce_sum(t) / get_world_size()


def reduce_dict_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average a dict of scalar tensors over processes in one collective; returns floats.

    Every process must pass the same keys (they are sorted before stacking).
    """
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()).cpu() for k in keys])
    if get_world_size() > 1:
        stacked = all_reduce_mean(stacked).cpu()
    return {k: float(v) for k, v in zip(keys, stacked.tolist(), strict=True)}


def all_gather_object(obj: Any) -> list[Any]:
    """Gather one picklable object from every process; ``[obj]`` in a single process."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Broadcast a picklable object from ``src`` to every process."""
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
