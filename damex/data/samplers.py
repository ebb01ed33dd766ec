"""Dataset-aware, distributed, resumable batch samplers (docs/design.md §4.4, bug Q10).

``DatasetAwareSampler`` yields batches of *global* indices into the concatenation of the
training datasets (dataset ``d`` owns ``[offset_d, offset_d + n_d)``). Every rank derives the
same global batch order from ``(seed, epoch)`` with a local ``torch.Generator`` and then takes
the disjoint shard ``rank::world_size`` of the batches (the official ``WeightedDistributedSampler``
drew from the global RNG seeded ``seed + rank``, so ranks sampled independently instead of
sharding: docs/design.md Q10).

Modes (``p_d`` = probability that a sample comes from dataset ``d``):

- ``proportional``: ``p_d ∝ n_d``; one epoch of ``sum(n_d)`` samples is a permutation of the
  concatenation (the official default, ``DistributedSampler`` over ``ConcatDataset``).
- ``uniform``: ``p_d = 1 / D`` (the official ``--weighted_sampler`` intent).
- ``temperature``: ``p_d ∝ n_d ** (1 / τ)`` (τ = 1 is proportional, τ -> inf is uniform).
- ``repeat_factor``: LVIS-style per-image repeat factors (Gupta et al., LVIS, CVPR 2019, §5:
  ``r(c) = max(1, sqrt(t / f(c)))``, ``r(i) = max_{c in i} r(c)``), stochastically rounded per
  epoch.

For ``uniform`` / ``temperature`` the per-dataset counts of an epoch are fixed by
largest-remainder rounding of ``N * p_d`` (stratified, so the empirical frequencies equal the
target up to rounding), the dataset order is a random interleaving, and inside a dataset the
images come from fresh permutations, concatenated when a dataset is drawn more than ``n_d``
times.

Exact resume: ``state_dict()`` records the epoch and the number of *global* batches consumed
(``rank``-local count times ``world_size``), so a run can even resume with another world size
(same ``batch_size`` and ``seed``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from damex.config import SamplerMode, choices

__all__ = [
    "SAMPLER_MODES",
    "DatasetAwareSampler",
    "InferenceSampler",
    "dataset_weights",
    "repeat_factors",
    "derive_seed",
]

logger = logging.getLogger(__name__)

SAMPLER_MODES = choices(SamplerMode)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy ``SeedSequence`` hashing, platform-stable).

    Used for every derived stream: ``(seed, epoch, stream)`` for sampler orders, ``(seed, epoch,
    global batch number, position)`` for per-sample augmentation seeds.
    """
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys])
    return int(state.generate_state(1, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF)


def dataset_weights(
    dataset_sizes: Sequence[int], mode: str, temperature: float = 2.0
) -> list[float]:
    """Target probability that a sample comes from each dataset.

    Args:
        dataset_sizes: ``n_d`` per dataset.
        mode: ``proportional`` | ``uniform`` | ``temperature``.
        temperature: τ of ``p_d ∝ n_d ** (1 / τ)``.

    Returns:
        ``p_d`` per dataset, summing to 1.
    """
    sizes = [int(n) for n in dataset_sizes]
    if mode == "proportional":
        raw = [float(n) for n in sizes]
    elif mode == "uniform":
        raw = [1.0] * len(sizes)
    elif mode == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        raw = [float(n) ** (1.0 / temperature) for n in sizes]
    else:
        raise ValueError(
            f"dataset_weights: mode must be proportional | uniform | temperature, got {mode!r}"
        )
    total = sum(raw)
    return [r / total for r in raw]


def repeat_factors(image_labels: Sequence[Sequence[int]], threshold: float) -> list[float]:
    """LVIS repeat factors per image (Gupta et al., LVIS, CVPR 2019, §5).

    ``f(c)`` is the fraction of images that contain category ``c``;
    ``r(c) = max(1, sqrt(threshold / f(c)))``; ``r(i) = max`` over the categories of image ``i``
    (1 for an image without annotations).

    Args:
        image_labels: unified labels of every image (duplicates allowed).
        threshold: ``t``; categories in fewer than a fraction ``t`` of the images are repeated.

    Returns:
        ``r(i) >= 1`` per image.
    """
    if threshold < 0:
        raise ValueError(f"repeat threshold must be >= 0, got {threshold}")
    num_images = len(image_labels)
    if num_images == 0:
        return []
    counts: dict[int, int] = {}
    for labels in image_labels:
        for c in set(int(x) for x in labels):
            counts[c] = counts.get(c, 0) + 1
    cat_factor = {c: max(1.0, math.sqrt(threshold / (n / num_images))) for c, n in counts.items()}
    return [max((cat_factor[int(c)] for c in labels), default=1.0) for labels in image_labels]


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total`` closest to ``total * weights`` (Hamilton's method)."""
    exact = [total * w for w in weights]
    counts = [int(math.floor(x)) for x in exact]
    short = total - sum(counts)
    order = sorted(range(len(weights)), key=lambda d: (-(exact[d] - counts[d]), d))
    for d in order[:short]:
        counts[d] += 1
    return counts


class DatasetAwareSampler(Sampler[list[int]]):
    """Batch sampler over a concatenation of datasets; distributed and exactly resumable.

    Iterating yields this rank's batches (lists of global indices). All ranks compute the same
    global batch list for ``(seed, epoch)`` and take batches ``rank::world_size``; every rank gets
    the same number of batches (trailing batches are dropped with ``drop_last``, otherwise the
    shard is padded by wrapping around to the first batches).

    Args:
        dataset_sizes: number of images of every dataset, in concatenation order.
        mode: ``proportional`` | ``uniform`` | ``temperature`` | ``repeat_factor``.
        temperature: τ for ``temperature``.
        repeat_factors: per-image ``r(i) >= 1`` over the concatenation (``repeat_factor`` mode;
            see ``repeat_factors()``).
        num_samples: samples per epoch over all ranks; default ``sum(dataset_sizes)`` (for
            ``repeat_factor``: the length of the epoch's repeated list).
        batch_size: images per batch (per rank).
        homogeneous_batches: every batch holds images of one dataset.
        rank: this process's rank.
        world_size: number of processes.
        seed: base seed; the order depends only on ``(seed, epoch)``.
        drop_last: drop a trailing partial batch and the batches that do not divide evenly
            over ranks (else keep the partial batch and pad ranks by wrapping around).
    """

    def __init__(
        self,
        dataset_sizes: Sequence[int],
        *,
        mode: str = "proportional",
        temperature: float = 2.0,
        repeat_factors: Sequence[float] | None = None,
        num_samples: int | None = None,
        batch_size: int = 1,
        homogeneous_batches: bool = False,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        sizes = [int(n) for n in dataset_sizes]
        if not sizes or any(n <= 0 for n in sizes):
            raise ValueError(f"dataset_sizes must be non-empty and all > 0, got {sizes}")
        if mode not in SAMPLER_MODES:
            raise ValueError(f"sampler mode must be one of {SAMPLER_MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world={world_size}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 or None, got {num_samples}")
        total = sum(sizes)
        if mode == "repeat_factor":
            if repeat_factors is None or len(repeat_factors) != total:
                got = None if repeat_factors is None else len(repeat_factors)
                raise ValueError(
                    f"repeat_factor mode needs one repeat factor per image ({total}), got {got}"
                )
            if min(repeat_factors) < 1.0:
                raise ValueError(f"repeat factors must be >= 1, got min {min(repeat_factors)}")
            self._repeat = torch.tensor([float(r) for r in repeat_factors], dtype=torch.float64)
        else:
            self._repeat = None
        self.dataset_sizes = sizes
        self.offsets = [0]
        for n in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.mode = mode
        self.temperature = float(temperature)
        self.num_samples = num_samples
        self.batch_size = int(batch_size)
        self.homogeneous_batches = bool(homogeneous_batches)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._pending_start: int | None = None  # global batches to skip at the next __iter__
        self._active_start = 0  # global batches skipped by the current / last iteration
        self._local_consumed = 0  # batches of this rank consumed in the current iteration
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    # ------------------------------------------------------------------ the global plan
    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, stream))

    def _epoch_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's global sample order and the dataset of every sample, both ``[N]``."""
        g = self._generator(0)
        total = sum(self.dataset_sizes)
        if self.mode in ("proportional", "repeat_factor"):
            if self.mode == "proportional":
                pool = torch.arange(total)
            else:
                assert self._repeat is not None
                frac = self._repeat - self._repeat.floor()
                # stochastic rounding (LVIS): E[repeats] = r(i), seeded by (seed, epoch)
                reps = (
                    self._repeat.floor()
                    + (torch.rand(total, generator=g, dtype=torch.float64) < frac).double()
                )
                pool = torch.repeat_interleave(torch.arange(total), reps.long())
            n = self.num_samples or int(pool.numel())
            rounds = [
                pool[torch.randperm(pool.numel(), generator=g)]
                for _ in range(-(-n // pool.numel()))
            ]
            order = torch.cat(rounds)[:n]
        else:
            n = self.num_samples or total
            weights = dataset_weights(self.dataset_sizes, self.mode, self.temperature)
            counts = _largest_remainder(n, weights)
            parts = []
            for d, (size, c) in enumerate(zip(self.dataset_sizes, counts)):
                perms = [torch.randperm(size, generator=g) for _ in range(-(-c // size))]
                local = torch.cat(perms)[:c] if perms else torch.zeros(0, dtype=torch.long)
                parts.append(local + self.offsets[d])
            # random interleaving of the datasets; each dataset keeps its permutation order
            slots = torch.cat([torch.full((c,), d) for d, c in enumerate(counts)])
            slots = slots[torch.randperm(n, generator=g)]
            order = torch.empty(n, dtype=torch.long)
            for d, part in enumerate(parts):
                order[slots == d] = part
        ends = torch.tensor(self.offsets[1:] + [total])
        datasets = torch.bucketize(order, ends, right=True)
        return order, datasets

    def _global_batches(self) -> list[list[int]]:
        """All batches of the epoch over all ranks, in global order (cached per epoch)."""
        if self._plan_cache is not None and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        order, datasets = self._epoch_indices()
        bs = self.batch_size
        if self.homogeneous_batches:
            batches: list[list[int]] = []
            for d in range(len(self.dataset_sizes)):
                mine = order[datasets == d].tolist()
                stop = len(mine) - len(mine) % bs if self.drop_last else len(mine)
                batches.extend(mine[i : i + bs] for i in range(0, stop, bs))
                if mine and stop == 0 and self.epoch == 0:
                    logger.warning(
                        "homogeneous batches: dataset %d has %d samples per epoch, fewer than "
                        "batch_size %d, so it is never sampled (drop_last)",
                        d,
                        len(mine),
                        bs,
                    )
            g = self._generator(1)
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        else:
            flat = order.tolist()
            stop = len(flat) - len(flat) % bs if self.drop_last else len(flat)
            batches = [flat[i : i + bs] for i in range(0, stop, bs)]
        self._plan_cache = (self.epoch, batches)
        return batches

    def _shard(self, start: int) -> list[tuple[int, list[int]]]:
        """This rank's ``(global batch number, batch)`` pairs after skipping ``start`` batches."""
        remaining = self._global_batches()[start:]
        ws = self.world_size
        if self.drop_last:
            per_rank = len(remaining) // ws
        else:
            per_rank = -(-len(remaining) // ws)
        positions = [j * ws + self.rank for j in range(per_rank)]
        if not remaining:
            return []
        return [(start + p, remaining[p % len(remaining)]) for p in positions]

    # ------------------------------------------------------------------ public API
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (the order depends only on ``(seed, epoch)``).

        Setting the epoch a ``load_state_dict`` restored keeps its resume position.
        """
        if epoch != self.epoch:
            self._pending_start = None
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for _, batch in self.iter_numbered():
            yield batch

    def iter_numbered(self) -> Iterator[tuple[int, list[int]]]:
        """Like ``__iter__`` but yields ``(global batch number, batch)``.

        The global batch number identifies the batch's position in the epoch independently of
        the rank layout (used to derive per-sample augmentation seeds).
        """
        start = self._pending_start or 0
        self._pending_start = None
        self._active_start = start
        self._local_consumed = 0
        for number, batch in self._shard(start):
            self._local_consumed += 1
            yield number, batch

    def __len__(self) -> int:
        """Number of batches of this rank in a full epoch (the current one)."""
        return len(self._shard(0))

    def mark_consumed(self, num_batches: int) -> None:
        """Record that ``num_batches`` batches of the current iteration reached the consumer.

        A prefetching ``DataLoader`` pulls batches from the sampler ahead of the training loop;
        a loader that knows what it delivered calls this so ``state_dict`` stays exact.
        """
        self._local_consumed = int(num_batches)

    @property
    def global_batches_consumed(self) -> int:
        """Global batches of the current epoch consumed over all ranks."""
        if self._pending_start is not None:
            return self._pending_start
        return self._active_start + self._local_consumed * self.world_size

    def state_dict(self) -> dict[str, Any]:
        """Resume state: the epoch and the global number of batches consumed in it."""
        return {
            "epoch": self.epoch,
            "global_batches_consumed": self.global_batches_consumed,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "mode": self.mode,
            "dataset_sizes": list(self.dataset_sizes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the next iteration continues the identical sequence.

        Raises:
            ValueError: if the seed, batch size, mode or dataset sizes differ from the saved run
                (the sequence could not be continued exactly).
        """
        for key in ("seed", "batch_size", "mode", "dataset_sizes"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(
                    f"sampler state: {key} was {state[key]!r} in the checkpoint, now {mine!r}; "
                    "exact resume needs the same value"
                )
        self.epoch = int(state["epoch"])
        self._pending_start = int(state["global_batches_consumed"])
        self._active_start = self._pending_start
        self._local_consumed = 0


class InferenceSampler(Sampler[int]):
    """Contiguous shard of ``range(size)`` for ``rank``; every index once over all ranks.

    Shard sizes differ by at most one (the first ``size % world_size`` ranks get one more).
    """

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world={world_size}")
        base, extra = divmod(size, world_size)
        self.begin = rank * base + min(rank, extra)
        self.end = self.begin + base + (1 if rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin
