"""A DataLoader worker process that dies (SIGKILL, as the OOM killer sends) -> a DatasetError
that names the sample it was loading."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from damex.data.coco import CocoDetection, read_categories
from damex.data.label_space import LabelSpace
from damex.data.loader import DamexLoader, TrainDataset, _InFlight, _SkipCounter
from damex.errors import DatasetError
from damex.structures import Sample


class _DieOn:
    """A train transform that kills its own worker process on one image id (a real death)."""

    def __init__(self, image_id: int) -> None:
        self.image_id = image_id

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if sample.image_id == self.image_id:
            os.kill(os.getpid(), signal.SIGKILL)
        return sample


def _first(batch: list[Sample]) -> list[int]:
    return [s.image_id for s in batch]


def _dataset(root: Path) -> CocoDetection:
    ann = root / "syn_photo/annotations/train.json"
    space = LabelSpace.build([("syn_photo", read_categories(ann), None)])
    return CocoDetection(ann, root / "syn_photo/images", 0, space)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_dead_worker_names_the_sample(fault_synthetic_root: Path, num_workers: int) -> None:
    ds = _dataset(fault_synthetic_root)
    victim = 5  # image index
    info = ds.image_info(victim)
    train_set = TrainDataset(
        [ds],
        [_DieOn(info.image_id)],
        [None],
        _SkipCounter(1, num_workers),
        in_flight=_InFlight(num_workers),
    )
    loader = DamexLoader(
        train_set,
        dataset_names=["syn_photo"],
        counter=train_set.counter,
        batch_size=2,
        num_workers=num_workers,
        collate_fn=_first,
    )
    seen: list[int] = []
    with pytest.raises(DatasetError) as err:
        for batch in loader:
            seen += batch
    message = str(err.value)
    assert f"image id {info.image_id} ({info.path})" in message, message
    assert str(ds.ann_file) in message and "killed by SIGKILL" in message, message
    assert "data.num_workers" in message  # says what to do
    assert info.image_id not in seen
