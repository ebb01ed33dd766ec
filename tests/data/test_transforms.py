"""Train / test transforms: exact sizes, valid boxes consistent with the pixels, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from damex.config import DataConfig
from damex.data.catalog import DatasetSpec
from damex.data.transforms import EvalTransform, TrainTransform, build_transforms, resize_shape
from damex.structures import Sample

# three solid, non-overlapping rectangles; the colour of box k is COLORS[k]
BOXES = torch.tensor([[10, 8, 50, 40], [70, 20, 150, 60], [5, 70, 60, 115]], dtype=torch.float32)
LABELS = torch.tensor([7, 3, 11])
COLORS = {7: (250, 0, 0), 3: (0, 250, 0), 11: (0, 0, 250)}


def _sample(h: int = 120, w: int = 160) -> Sample:
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    for box, label in zip(BOXES.long().tolist(), LABELS.tolist()):
        x1, y1, x2, y2 = box
        image[:, y1:y2, x1:x2] = torch.tensor(COLORS[label], dtype=torch.uint8).view(3, 1, 1)
    return Sample(
        image=image,
        boxes=BOXES.clone(),
        labels=LABELS.clone(),
        dataset_id=2,
        image_id=17,
        orig_size=(h, w),
    )


def _check_valid(out: Sample) -> None:
    h, w = out.size
    assert out.image.dtype == torch.uint8 and out.image.shape[0] == 3
    assert out.labels.dtype == torch.int64 and out.boxes.dtype == torch.float32
    assert out.boxes.shape == (out.labels.shape[0], 4)
    b = out.boxes
    assert bool((b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all())
    assert bool((b[:, 0::2] >= 0).all() and (b[:, 0::2] <= w).all())
    assert bool((b[:, 1::2] >= 0).all() and (b[:, 1::2] <= h).all())
    assert set(out.labels.tolist()) <= set(LABELS.tolist())
    assert (out.dataset_id, out.image_id, out.orig_size) == (2, 17, (120, 160))


def _check_pixels_follow_boxes(out: Sample) -> None:
    """The centre pixel of every (not tiny) box has its label's colour."""
    for box, label in zip(out.boxes.tolist(), out.labels.tolist()):
        x1, y1, x2, y2 = box
        if x2 - x1 < 4 or y2 - y1 < 4:
            continue
        cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
        got = out.image[:, cy, cx].tolist()
        assert np.allclose(got, COLORS[label], atol=40), (box, label, got)


def test_resize_shape_closed_forms():
    assert resize_shape(480, 640, 800, 1333) == (800, 1066)  # 640 * 800 // 480
    assert resize_shape(640, 480, 800, 1333) == (1066, 800)
    assert resize_shape(100, 1000, 800, 1333) == (133, 1330)  # capped: 1333 * 100 // 1000
    assert resize_shape(50, 50, 32, 1000) == (32, 32)
    assert resize_shape(800, 900, 800, 1333) == (800, 900)
    for h, w in [(3, 1000), (999, 1), (1333, 1334), (7, 11)]:
        oh, ow = resize_shape(h, w, 800, 1333)
        assert max(oh, ow) <= 1333 and min(oh, ow) >= 1


def test_eval_transform_exact_size_and_scaled_boxes():
    out = EvalTransform(scale=60, max_size=1000)(_sample())
    assert out.size == (60, 80)
    torch.testing.assert_close(out.boxes, BOXES * 0.5, atol=1e-3, rtol=0)
    assert out.labels.tolist() == LABELS.tolist()
    _check_pixels_follow_boxes(out)
    capped = EvalTransform(scale=100, max_size=120)(_sample())
    assert capped.size == (90, 120)  # 120 * 120 // 160 = 90
    _check_valid(EvalTransform(scale=120, max_size=1000)(_sample()))


def test_horizontal_flip_mirrors_boxes():
    t = TrainTransform(scales=[120], max_size=1000, hflip=True, crop=False)
    flipped = BOXES[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([160, 0, 160, 0])
    seen = set()
    for seed in range(12):
        out = t(_sample(), np.random.default_rng(seed))
        assert out.size == (120, 160)
        if torch.allclose(out.boxes, BOXES, atol=1e-3):
            seen.add("same")
        else:
            torch.testing.assert_close(out.boxes, flipped, atol=1e-3, rtol=0)
            seen.add("flip")
        _check_pixels_follow_boxes(out)
    assert seen == {"same", "flip"}


def test_train_pipeline_keeps_boxes_valid_and_consistent_with_pixels():
    t = TrainTransform(
        scales=[64, 80, 96], max_size=150, crop=True, crop_scales=[100, 120], crop_size=[40, 90]
    )
    dropped_some = False
    for seed in range(40):
        out = t(_sample(), np.random.default_rng(seed))
        _check_valid(out)
        _check_pixels_follow_boxes(out)
        h, w = out.size
        assert min(h, w) in (64, 80, 96) or max(h, w) <= 150
        assert max(h, w) <= 150
        dropped_some |= len(out.labels) < 3
    assert dropped_some  # the crop branch really removes boxes outside the window


def test_train_pipeline_deterministic_for_a_fixed_seed():
    t = TrainTransform(
        scales=[64, 80, 96], max_size=150, crop_scales=[100, 120], crop_size=[40, 90]
    )
    outs = [t(_sample(), np.random.default_rng([5, 1, 3])) for _ in range(2)]
    assert torch.equal(outs[0].image, outs[1].image)
    assert torch.equal(outs[0].boxes, outs[1].boxes)
    assert torch.equal(outs[0].labels, outs[1].labels)
    sizes = {t(_sample(), np.random.default_rng(s)).size for s in range(10)}
    assert len(sizes) > 1


def test_empty_and_degenerate_boxes():
    s = _sample()
    empty = s.replace(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
    t = TrainTransform(scales=[64], max_size=200, crop_scales=[100], crop_size=[40, 90])
    for seed in range(4):
        out = t(empty, np.random.default_rng(seed))
        assert out.boxes.shape == (0, 4) and out.labels.shape == (0,)
        assert out.labels.dtype == torch.int64
    bad = s.replace(
        boxes=torch.tensor([[5.0, 5, 5, 20], [150, 10, 170, 20]]), labels=torch.tensor([1, 2])
    )
    out = EvalTransform(scale=60, max_size=1000)(bad)
    assert out.labels.tolist() == [2]  # zero-width box dropped, the other clipped to the image
    torch.testing.assert_close(out.boxes, torch.tensor([[75.0, 5, 80, 10]]), atol=1e-3, rtol=0)


def _spec() -> DatasetSpec:
    return DatasetSpec(
        name="d", image_root=Path("."), scales=[480, 512], test_scale=512, max_size=900
    )


def test_build_transforms_shared_and_per_dataset_scales():
    cfg = DataConfig()
    train = build_transforms(cfg, _spec(), train=True)
    assert isinstance(train, TrainTransform)
    assert train.scales == list(range(480, 801, 32)) and train.max_size == 1333
    test = build_transforms(cfg, _spec(), train=False)
    assert isinstance(test, EvalTransform) and (test.scale, test.max_size) == (800, 1333)
    per = DataConfig(per_dataset_scales=True)
    assert build_transforms(per, _spec(), train=True).scales == [480, 512]
    test = build_transforms(per, _spec(), train=False)
    assert (test.scale, test.max_size) == (512, 900)
    assert build_transforms(DataConfig(test_scale=600), None, train=False).scale == 600
    only_scales = DatasetSpec(name="e", image_root=Path("."), scales=[480, 544])
    test = build_transforms(per, only_scales, train=False)
    assert (test.scale, test.max_size) == (544, 1333)  # follows the dataset's scales
    no_crop = build_transforms(DataConfig(crop=False, hflip=False), None, train=True)
    out = no_crop(_sample(), np.random.default_rng(0))
    assert min(out.size) in range(480, 801, 32)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="scales"):
        TrainTransform(scales=[], max_size=10)
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(scales=[10], max_size=10, crop_size=[50, 20])
