"""Batching: ``collate`` (pad + mask), the training loader and the per-dataset test loaders.

Training (``build_train_loader``): one ``CocoDetection`` per ``data.train`` dataset (optionally a
seeded ``data.limited`` P% image subset), concatenated; a ``DatasetAwareSampler`` picks batches of
global indices; every sample's augmentation seed is derived from ``(train.seed, epoch, global
batch number, position in batch)``, so the stream does not depend on worker scheduling and an
exact resume (``sampler.state_dict()``) replays identical batches.

Testing (``build_test_loaders``): one loader per evaluation dataset (its test split, the
deterministic test resize, ``eval.batch_size``, ``eval.max_images`` cap, contiguous rank shards).

Bad samples: with ``data.on_bad_sample="error"`` a worker's ``DatasetError`` (naming the JSON,
the image id and the file) surfaces in the main process; any other exception in loading or
augmentation is re-raised as ``DatasetError`` naming the file. With ``"skip"``, ``CocoDetection``
replaces an undecodable image by the next readable one; the training loader keeps that
substitute (the batch keeps its size and dataset) and the test loaders drop it (an image must
not be evaluated twice). Both count it per dataset, across worker processes:
``loader.skipped_counts()``.

A worker process that dies (killed by the OOM killer, a crash in an image decoder) surfaces as
a ``DatasetError`` that names the sample it was loading (dataset file, image id, image file):
every worker records its current sample in shared memory (``_InFlight``).
"""

from __future__ import annotations

import bisect
import logging
import random
import re
import signal
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from damex.data.coco import CocoDetection
from damex.data.samplers import (
    DatasetAwareSampler,
    InferenceSampler,
    derive_seed,
    repeat_factors,
)
from damex.data.subsets import select_subset
from damex.data.transforms import SampleTransform, build_transforms
from damex.errors import ConfigError, DatasetError
from damex.structures import Batch, Sample, Target, normalize_boxes

if TYPE_CHECKING:
    from damex.config import Config, DataConfig
    from damex.data.catalog import DatasetCatalog
    from damex.data.label_space import LabelSpace

__all__ = [
    "collate",
    "DamexLoader",
    "TrainDataset",
    "EvalDataset",
    "build_train_loader",
    "build_test_loaders",
    "worker_init_fn",
]

logger = logging.getLogger(__name__)

_AUGMENT_STREAM = 0xA06  # separates augmentation seeds from the sampler's streams


# ----------------------------------------------------------------------------------- collate
def collate(
    samples: Sequence[Sample | None],
    expert_of_dataset: Tensor | None = None,
    *,
    size_divisibility: int = 0,
) -> Batch:
    """Pad samples into a ``Batch`` (DETR's NestedTensor plus the dataset identity).

    Args:
        samples: transformed samples; ``None`` entries (dropped bad samples) are ignored.
        expert_of_dataset: ``int64`` ``[num_datasets]`` expert of every dataset id, or None
            (then every ``expert_ids`` entry is -1).
        size_divisibility: round the padded height and width up to a multiple of this (0 / 1:
            pad to the largest image only).

    Returns:
        ``Batch`` with ``images`` ``float32 [B, 3, H, W]`` zero padded at right/bottom, ``mask``
        ``bool [B, H, W]`` True on padding, ``targets`` with ``cxcywh`` boxes normalized by each
        image's unpadded (transformed) size, ``dataset_ids`` / ``expert_ids`` / ``image_ids``
        ``[B]``, ``image_sizes`` / ``orig_sizes`` ``[B, 2]`` as ``(height, width)``.

    Raises:
        ValueError: no sample left, or a dataset id outside ``expert_of_dataset``.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        raise ValueError("collate: no samples to batch (all were dropped)")
    sizes = torch.tensor([s.size for s in kept], dtype=torch.int64)  # [B, 2]
    pad_h, pad_w = (int(v) for v in sizes.max(dim=0).values)
    if size_divisibility > 1:
        pad_h = -(-pad_h // size_divisibility) * size_divisibility
        pad_w = -(-pad_w // size_divisibility) * size_divisibility
    images = torch.zeros(len(kept), 3, pad_h, pad_w, dtype=torch.float32)  # [B, 3, H, W]
    mask = torch.ones(len(kept), pad_h, pad_w, dtype=torch.bool)  # [B, H, W]
    targets = []
    for i, s in enumerate(kept):
        h, w = s.size
        images[i, :, :h, :w] = s.image  # uint8 -> float32, values in [0, 255]
        mask[i, :h, :w] = False
        boxes = normalize_boxes(s.boxes.to(torch.float32), h, w)  # [N, 4] cxcywh in [0, 1]
        targets.append(Target(boxes=boxes, labels=s.labels.to(torch.int64)))
    dataset_ids = torch.tensor([s.dataset_id for s in kept], dtype=torch.int64)
    if expert_of_dataset is None:
        expert_ids = torch.full_like(dataset_ids, -1)
    else:
        table = torch.as_tensor(expert_of_dataset, dtype=torch.int64)
        if int(dataset_ids.max()) >= table.numel() or int(dataset_ids.min()) < 0:
            raise ValueError(
                f"collate: dataset ids {sorted(set(dataset_ids.tolist()))} outside "
                f"expert_of_dataset of length {table.numel()}"
            )
        expert_ids = table[dataset_ids]
    return Batch(
        images=images,
        mask=mask,
        targets=targets,
        dataset_ids=dataset_ids,
        expert_ids=expert_ids,
        image_ids=torch.tensor([s.image_id for s in kept], dtype=torch.int64),
        image_sizes=sizes,
        orig_sizes=torch.tensor([s.orig_size for s in kept], dtype=torch.int64),
    )


class _Collator:
    """Picklable ``collate_fn``: drops ``None`` samples; an all-dropped batch becomes ``None``."""

    def __init__(self, expert_of_dataset: Tensor | None, size_divisibility: int) -> None:
        self.expert_of_dataset = expert_of_dataset
        self.size_divisibility = size_divisibility

    def __call__(self, samples: list[Sample | None]) -> Batch | None:
        if all(s is None for s in samples):
            return None
        return collate(samples, self.expert_of_dataset, size_divisibility=self.size_divisibility)


# ---------------------------------------------------------------------------- skip counting
class _SkipCounter:
    """Per-dataset skip counts shared by the main process and the workers (lock-free).

    A shared-memory ``int64 [num_workers + 1, D]`` tensor: each worker writes its own row, the
    main process (``num_workers == 0``) the last one.
    """

    def __init__(self, num_datasets: int, num_workers: int) -> None:
        self.table = torch.zeros(num_workers + 1, num_datasets, dtype=torch.int64).share_memory_()

    def add(self, slot: int) -> None:
        info = get_worker_info()
        row = info.id if info is not None else self.table.shape[0] - 1
        self.table[row, slot] += 1

    def totals(self) -> list[int]:
        return self.table.sum(dim=0).tolist()


class _InFlight:
    """The sample each DataLoader worker is loading now, in shared memory (lock-free).

    Row ``w`` of the ``int64 [num_workers, 2]`` table is ``(dataset position, image index)``
    while worker ``w`` loads that image, ``(-1, -1)`` otherwise. The main process reads it when
    a worker dies, to name the sample it died on.
    """

    def __init__(self, num_workers: int) -> None:
        self.table = torch.full((max(num_workers, 1), 2), -1, dtype=torch.int64).share_memory_()

    def begin(self, d: int, k: int) -> None:
        info = get_worker_info()
        if info is not None:
            self.table[info.id, 0] = d
            self.table[info.id, 1] = k

    def end(self) -> None:
        info = get_worker_info()
        if info is not None:
            self.table[info.id] = -1

    def busy(self, worker_ids: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
        """``(worker id, dataset position, image index)`` of the workers loading a sample."""
        rows = self.table.tolist()
        ids = range(len(rows)) if worker_ids is None else worker_ids
        return [(w, rows[w][0], rows[w][1]) for w in ids if 0 <= w < len(rows) and rows[w][0] >= 0]


def _describe_sample(ds: CocoDetection, k: int) -> str:
    try:
        info = ds.image_info(k)
        return f"{ds.ann_file}: image id {info.image_id} ({info.path})"
    except Exception:  # the message must still name the dataset file
        return f"{ds.ann_file}: index {k}"


def _wrap_error(ds: CocoDetection, k: int, what: str, e: Exception) -> DatasetError:
    try:
        info = ds.image_info(k)
        where = f"image id {info.image_id} ({info.path})"
    except Exception:  # the message must still name the dataset file
        where = f"index {k}"
    return DatasetError(f"{ds.ann_file}: {where}: {what} failed: {type(e).__name__}: {e}")


def _load(ds: CocoDetection, k: int) -> tuple[Sample, bool]:
    """Image ``k`` of ``ds`` and whether CocoDetection substituted another one (skip mode).

    Errors other than ``DatasetError`` are re-raised naming the dataset file and the image.
    """
    try:
        sample = ds[k]
    except DatasetError:
        raise
    except Exception as e:
        raise _wrap_error(ds, k, "loading", e) from e
    return sample, sample.image_id != ds.image_info(k).image_id


# ---------------------------------------------------------------------------------- datasets
class TrainDataset(Dataset):
    """Concatenation of training datasets addressed by ``(global index, augmentation seed)``.

    Args:
        datasets: one ``CocoDetection`` per training dataset (no transform of their own).
        transforms: one train transform per dataset.
        subsets: per dataset, the kept image indices (``data.limited``) or None for all.
        counter: skip counter (one slot per dataset in ``datasets``).
        in_flight: where workers record the sample they load (default: not recorded).
    """

    def __init__(
        self,
        datasets: Sequence[CocoDetection],
        transforms: Sequence[SampleTransform],
        subsets: Sequence[Sequence[int] | None],
        counter: _SkipCounter,
        in_flight: _InFlight | None = None,
    ) -> None:
        if not len(datasets) == len(transforms) == len(subsets):
            raise ValueError("TrainDataset: datasets, transforms and subsets must align")
        self.datasets = list(datasets)
        self.transforms = list(transforms)
        self.subsets = [None if s is None else list(s) for s in subsets]
        self.sizes = [len(d) if s is None else len(s) for d, s in zip(self.datasets, self.subsets)]
        self._ends = np.cumsum(self.sizes).tolist()
        self.counter = counter
        self.in_flight = in_flight

    def __len__(self) -> int:
        return int(sum(self.sizes))

    def locate(self, index: int) -> tuple[int, int]:
        """``(position of the dataset in the list, image index inside that CocoDetection)``."""
        if not 0 <= index < len(self):
            raise IndexError(f"global index {index} out of range [0, {len(self)})")
        d = bisect.bisect_right(self._ends, index)
        local = index - (self._ends[d - 1] if d else 0)
        subset = self.subsets[d]
        return d, (local if subset is None else subset[local])

    def image_labels(self, index: int) -> list[int]:
        """Unified labels of a global index (metadata only)."""
        d, k = self.locate(index)
        return self.datasets[d].image_labels(k)

    def describe(self, d: int, k: int) -> str:
        """The sample ``(dataset position, image index)`` in words (file and image id)."""
        return _describe_sample(self.datasets[d], k)

    def __getitem__(self, key: tuple[int, int] | int) -> Sample:
        index, seed = key if isinstance(key, tuple) else (key, None)
        d, k = self.locate(int(index))
        ds = self.datasets[d]
        if self.in_flight is not None:
            self.in_flight.begin(d, k)
        sample, substituted = _load(ds, k)
        if substituted:  # skip mode: counted, the substitute keeps the batch's size and dataset
            self.counter.add(d)
        rng = np.random.default_rng(seed)
        try:
            out = self.transforms[d](sample, rng)
        except Exception as e:
            raise _wrap_error(ds, k, "augmentation", e) from e
        if self.in_flight is not None:
            self.in_flight.end()
        return out


class EvalDataset(Dataset):
    """One test dataset (first ``len(indices)`` images), deterministic transform.

    A sample that ``CocoDetection`` substituted (skip mode) is returned as ``None`` and counted.
    """

    def __init__(
        self,
        dataset: CocoDetection,
        transform: SampleTransform,
        indices: Sequence[int],
        counter: _SkipCounter,
        in_flight: _InFlight | None = None,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.indices = list(indices)
        self.counter = counter
        self.in_flight = in_flight

    def describe(self, d: int, k: int) -> str:
        """The sample of image index ``k`` in words (``d`` is always 0 here)."""
        return _describe_sample(self.dataset, k)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample | None:
        k = self.indices[i]
        ds = self.dataset
        if self.in_flight is not None:
            self.in_flight.begin(0, k)
        sample, substituted = _load(ds, k)
        if substituted:
            self.counter.add(0)
            out = None
        else:
            try:
                out = self.transform(sample)
            except Exception as e:
                raise _wrap_error(ds, k, "test transform", e) from e
        if self.in_flight is not None:
            self.in_flight.end()
        return out


class _SeededBatches(Sampler[list[tuple[int, int]]]):
    """Adds a per-sample augmentation seed to every index of a ``DatasetAwareSampler`` batch."""

    def __init__(self, sampler: DatasetAwareSampler, seed: int) -> None:
        self.sampler = sampler
        self.seed = seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch  # read when iteration starts: call set_epoch before iter()
        for number, batch in self.sampler.iter_numbered():
            yield [
                (i, derive_seed(self.seed, epoch, number, k, _AUGMENT_STREAM))
                for k, i in enumerate(batch)
            ]

    def __len__(self) -> int:
        return len(self.sampler)


# ------------------------------------------------------------------------------------ loader
def worker_init_fn(worker_id: int) -> None:
    """Seed ``random`` / ``numpy`` from the worker's torch seed.

    The torch seed is ``base_seed + worker_id`` with ``base_seed`` drawn from the loader's
    seeded generator, so it is deterministic. (The augmentations do not read these global
    RNGs; this keeps any third-party randomness reproducible too.) OpenCV threading is off
    process-wide (``damex.data.transforms``); touching its pool in a forked child could hang.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class DamexLoader(DataLoader):
    """A ``DataLoader`` that keeps the train sampler's resume state exact and counts skips.

    It tells the ``DatasetAwareSampler`` how many batches reached the caller (the base class
    prefetches from the sampler), skips batches whose every sample was dropped, and exposes the
    per-dataset skip counts of all worker processes.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        dataset_names: Sequence[str],
        counter: _SkipCounter,
        train_sampler: DatasetAwareSampler | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.dataset_names = list(dataset_names)
        self.counter = counter
        self.train_sampler = train_sampler

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        delivered = 0
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if _WORKER_DIED.search(str(e)) is None:
                    raise
                raise self._worker_died(e, it) from e
            delivered += 1
            if self.train_sampler is not None:
                self.train_sampler.mark_consumed(delivered)
            if batch is not None:
                yield batch

    def _worker_died(self, err: RuntimeError, it: Any) -> DatasetError:
        """A ``DatasetError`` naming the sample(s) the dead worker(s) were loading."""
        in_flight = getattr(self.dataset, "in_flight", None)
        pids = {int(p) for p in re.findall(r"\d+", _WORKER_DIED.search(str(err)).group(1))}
        workers = getattr(it, "_workers", [])
        ids = [w for w, proc in enumerate(workers) if getattr(proc, "pid", None) in pids]
        busy = in_flight.busy(ids or None) if in_flight is not None else []
        if busy:
            samples = "; ".join(self.dataset.describe(d, k) for _, d, k in busy)
            what = f"while loading {samples}"
        else:
            what = "between samples (no sample was being loaded)"
        how = []
        for w in ids:
            code = getattr(workers[w], "exitcode", None)
            if code is not None and code < 0:
                how.append(f"worker {w} killed by {signal.Signals(-code).name}")
            elif code is not None:
                how.append(f"worker {w} exit code {code}")
        detail = f"{err}; {', '.join(how)}" if how else str(err)
        return DatasetError(
            f"a DataLoader worker died {what} ({detail}). A worker dies when the system kills it "
            "(out of memory) or an image decoder crashes: check that image, lower "
            "data.num_workers, or set data.num_workers=0 to load in the main process"
        )

    def skipped_counts(self) -> dict[str, int]:
        """Images replaced (train) or dropped (test) because they could not be read."""
        return dict(zip(self.dataset_names, self.counter.totals()))


# torch's messages for a worker that vanished: "DataLoader worker (pid 123) is killed by signal:
# Killed.", "DataLoader worker (pid(s) 123, 456) exited unexpectedly"
_WORKER_DIED = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)")


def _loader_kwargs(num_workers: int, seed: int, *, persistent: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "num_workers": num_workers,
        "worker_init_fn": worker_init_fn,
        "generator": torch.Generator().manual_seed(seed),
    }
    if num_workers > 0:
        kwargs["persistent_workers"] = persistent
    return kwargs


def _dataset_id(label_space: LabelSpace, name: str) -> int:
    try:
        return label_space.dataset_index(name)
    except KeyError:
        raise ConfigError(
            f"dataset {name!r} is not in the label space {label_space.dataset_names}; build the "
            "label space from every train and test dataset"
        ) from None


def _limited_subset(ds: CocoDetection, name: str, percent: float) -> list[int]:
    """Indices into ``ds`` of its ``data.limited`` subset (``percent`` % of the images)."""
    # The subset is a property of (dataset, percent), like the official fsPerc files: the
    # same images as `tools/make_subsets.py` writes (seed 0), whatever train.seed is.
    kept = select_subset(ds.image_ids, float(percent), seed=0)
    subset = [i for i, image_id in enumerate(ds.image_ids) if image_id in kept]
    logger.info("%s: limited to %d of %d images (%g%%)", name, len(subset), len(ds), percent)
    return subset


def _train_datasets(
    data: DataConfig, catalog: DatasetCatalog, label_space: LabelSpace
) -> tuple[list[CocoDetection], list[SampleTransform], list[list[int] | None]]:
    """Per ``data.train`` dataset: the dataset, its training transform, its limited subset."""
    datasets: list[CocoDetection] = []
    transforms: list[SampleTransform] = []
    subsets: list[list[int] | None] = []
    for name in data.train:
        spec = catalog.get(name)
        ds = CocoDetection.from_spec(
            spec,
            data.train_split,
            dataset_id=_dataset_id(label_space, name),
            label_space=label_space,
            out_of_bounds=data.out_of_bounds,
            on_bad_sample=data.on_bad_sample,
        )
        if len(ds) == 0:
            raise DatasetError(f"{ds.ann_file}: no usable training image in dataset {name!r}")
        subset = None
        if name in data.limited:
            subset = _limited_subset(ds, name, data.limited[name])
        datasets.append(ds)
        transforms.append(build_transforms(data, spec, train=True))
        subsets.append(subset)
    return datasets, transforms, subsets


def _train_sampler(
    cfg: Config, train_set: TrainDataset, rank: int, world_size: int
) -> DatasetAwareSampler:
    data = cfg.data
    factors = None
    if data.sampler == "repeat_factor":
        labels = [train_set.image_labels(i) for i in range(len(train_set))]
        factors = repeat_factors(labels, data.repeat_threshold)
    return DatasetAwareSampler(
        train_set.sizes,
        mode=data.sampler,
        temperature=data.temperature,
        repeat_factors=factors,
        num_samples=data.epoch_size or None,
        batch_size=cfg.train.batch_size,
        homogeneous_batches=data.homogeneous_batches,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        drop_last=True,
    )


def build_train_loader(
    cfg: Config,
    catalog: DatasetCatalog,
    label_space: LabelSpace,
    expert_of_dataset: Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    *,
    size_divisibility: int = 0,
) -> tuple[DamexLoader, DatasetAwareSampler, list[CocoDetection]]:
    """The training loader of a run.

    Args:
        cfg: the run config (``data``, ``train.batch_size``, ``train.seed``).
        catalog: dataset catalog.
        label_space: the run's label space (gives every dataset's ``dataset_id``).
        expert_of_dataset: ``int64 [num_datasets]`` expert per dataset id, or None.
        rank: this process's rank.
        world_size: number of processes.
        size_divisibility: pad batches to a multiple of this (0 = no rounding).

    Returns:
        ``(loader, sampler, datasets)``: call ``sampler.set_epoch(e)`` before iterating the
        loader each epoch; ``sampler.state_dict()`` is the exact resume position;
        ``datasets`` are the ``CocoDetection`` of ``data.train`` in order (full datasets; the
        ``data.limited`` subsets are ``loader.dataset.subsets``).

    Raises:
        DatasetError: from reading the annotation files.
    """
    data = cfg.data  # validated by damex.config (data.train, data.sampler, data.limited)
    names = list(data.train)
    datasets, transforms, subsets = _train_datasets(data, catalog, label_space)
    counter = _SkipCounter(len(names), data.num_workers)
    train_set = TrainDataset(
        datasets, transforms, subsets, counter, in_flight=_InFlight(data.num_workers)
    )
    sampler = _train_sampler(cfg, train_set, rank, world_size)
    if rank == 0:
        for name, size in zip(names, train_set.sizes):
            logger.info("train dataset %s: %d images", name, size)
        logger.info(
            "sampler %s: %d batches of %d per rank per epoch",
            data.sampler,
            len(sampler),
            cfg.train.batch_size,
        )
    loader = DamexLoader(
        train_set,
        dataset_names=names,
        counter=counter,
        train_sampler=sampler,
        batch_sampler=_SeededBatches(sampler, cfg.train.seed),
        collate_fn=_Collator(expert_of_dataset, size_divisibility),
        **_loader_kwargs(data.num_workers, cfg.train.seed, persistent=True),
    )
    return loader, sampler, datasets


def build_test_loaders(
    cfg: Config,
    catalog: DatasetCatalog,
    label_space: LabelSpace,
    datasets: Mapping[str, CocoDetection] | None = None,
    rank: int = 0,
    world_size: int = 1,
    *,
    expert_of_dataset: Tensor | None = None,
    size_divisibility: int = 0,
) -> dict[str, DamexLoader]:
    """One test loader per evaluation dataset (``cfg.eval_datasets``, in order).

    Datasets without the test split (e.g. voc12, evaluated through voc07) are skipped with a
    warning.

    Args:
        cfg: the run config (``data.test_split``, scales, ``eval.batch_size``,
            ``eval.max_images``).
        catalog: dataset catalog.
        label_space: the run's label space.
        datasets: already built test-split ``CocoDetection`` by name (reused, not re-read).
        rank: this process's rank (contiguous shard of every dataset).
        world_size: number of processes.
        expert_of_dataset: ``int64 [num_datasets]`` expert per dataset id, or None (-1).
        size_divisibility: pad batches to a multiple of this.

    Returns:
        ``{dataset name: loader}``; each image of a dataset is in exactly one rank's loader.
    """
    data = cfg.data
    split = data.test_split
    loaders: dict[str, DamexLoader] = {}
    for name in cfg.eval_datasets:
        spec = catalog.get(name)
        if datasets is not None and name in datasets:
            ds = datasets[name]
        elif not spec.has_split(split):
            logger.warning("dataset %s has no %r split; not evaluated", name, split)
            continue
        else:
            ds = CocoDetection.from_spec(
                spec,
                split,
                dataset_id=_dataset_id(label_space, name),
                label_space=label_space,
                out_of_bounds=data.out_of_bounds,
                on_bad_sample=data.on_bad_sample,
            )
        count = len(ds) if cfg.eval.max_images <= 0 else min(len(ds), cfg.eval.max_images)
        counter = _SkipCounter(1, data.num_workers)
        eval_set = EvalDataset(
            ds,
            build_transforms(data, spec, train=False),
            range(count),
            counter,
            in_flight=_InFlight(data.num_workers),
        )
        loaders[name] = DamexLoader(
            eval_set,
            dataset_names=[name],
            counter=counter,
            batch_size=cfg.eval.batch_size,
            sampler=InferenceSampler(count, rank=rank, world_size=world_size),
            drop_last=False,
            collate_fn=_Collator(expert_of_dataset, size_divisibility),
            # not persistent: D datasets x num_workers idle processes between evaluations
            **_loader_kwargs(data.num_workers, cfg.train.seed, persistent=False),
        )
    return loaders
