"""Train / test image pipelines on ``Sample`` (docs/design.md §4.5, quirk Q7).

Train (the DETR / DINO recipe, ``make_coco_transforms``):

1. horizontal flip with p = 0.5;
2. with p = 0.5 each, one of
   (a) random short-side resize over ``scales`` with the long side <= ``max_size``;
   (b) random short-side resize over ``crop_scales`` (no long-side cap, as in DINO), a random
       crop whose height and width are drawn from ``crop_size`` (boxes clipped to the crop,
       boxes that vanish dropped), then (a).

Test: short side = ``test_scale`` (default ``max(scales)``), long side <= ``max_size``.

Design: every random parameter (flip, branch, scales, crop window) is drawn up front from an
explicit ``numpy.random.Generator``; the geometric work (image and boxes) is done by
deterministic albumentations ops (``HorizontalFlip(p=1)``, ``Resize``, ``Crop``) with
``BboxParams``. So a sample's augmentation is a pure function of the generator's seed, which the
loader derives from ``(seed, epoch, global position)``: a worker's stream is reproducible and an
exact resume sees the same augmentations. Downscaling uses area interpolation (albumentations
``area_for_downscale``), upscaling bilinear, close to the antialiased PIL resize DETR uses.

Per-dataset scales (Q7): off by default, as in the official joint training (one shared scale
set); with ``data.per_dataset_scales`` the dataset's ``scales`` / ``test_scale`` / ``max_size``
from its ``DatasetSpec`` are used where set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from damex.structures import Sample

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import (deps.md)
import albumentations as A  # noqa: E402
import cv2  # noqa: E402

# OpenCV's thread pool does not survive fork(): reconfiguring it (cv2.setNumThreads) in a
# DataLoader worker forked after the parent ran threaded cv2 ops deadlocks the worker
# (reproduced here). Workers give the parallelism, so OpenCV runs single-threaded in every
# process and nothing touches the pool after fork (mmengine does the same).
cv2.setNumThreads(0)

if TYPE_CHECKING:
    from damex.config import DataConfig
    from damex.data.catalog import DatasetSpec

__all__ = [
    "SampleTransform",
    "TrainTransform",
    "EvalTransform",
    "resize_shape",
    "build_transforms",
]

logger = logging.getLogger(__name__)


class SampleTransform(Protocol):
    """``Sample -> Sample``; randomness only from ``rng`` (or the transform's own fallback)."""

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample: ...


def resize_shape(height: int, width: int, short_side: int, max_size: int | None) -> tuple[int, int]:
    """Output ``(height, width)`` of a short-side resize with a long-side cap.

    The short side becomes ``short_side`` unless the long side would exceed ``max_size``, in
    which case the short side shrinks to ``floor(max_size * short / long)`` (DETR
    ``get_size_with_aspect_ratio``; floor instead of round so the cap is never exceeded). The
    long side is ``floor(short * long / short_original)``.
    """
    if height < 1 or width < 1 or short_side < 1:
        raise ValueError(f"resize_shape needs positive sizes, got {height}x{width} -> {short_side}")
    lo, hi = min(height, width), max(height, width)
    if max_size is not None and max_size > 0 and hi * short_side > max_size * lo:
        short_side = max(1, max_size * lo // hi)
    if lo == short_side:
        return height, width
    if width < height:
        return max(1, short_side * height // width), short_side
    return short_side, max(1, short_side * width // height)


def _sanitize(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to the image (``float32 [N, 4]``) and the indices of the non-degenerate."""
    h, w = sample.size
    boxes = sample.boxes.detach().to(torch.float32).cpu().numpy().reshape(-1, 4).copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    keep = np.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[0]
    if len(keep) < len(boxes):
        logger.debug(
            "image %d: dropped %d degenerate boxes before augmentation",
            sample.image_id,
            len(boxes) - len(keep),
        )
    return boxes[keep], keep


def _apply(sample: Sample, ops: list[A.BasicTransform]) -> Sample:
    """Run deterministic albumentations ops on the image and boxes of ``sample``."""
    boxes, keep = _sanitize(sample)
    if not ops:
        labels = sample.labels[torch.as_tensor(keep, dtype=torch.long)].to(torch.int64)
        return sample.replace(boxes=torch.from_numpy(boxes), labels=labels)
    image = np.ascontiguousarray(sample.image.permute(1, 2, 0).cpu().numpy())  # [H, W, 3]
    pipeline = A.Compose(
        ops,
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["index"], clip=True),
    )
    out = pipeline(image=image, bboxes=boxes, index=np.arange(len(boxes)))
    new_image = torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1)  # [3, H', W']
    new_h, new_w = int(new_image.shape[1]), int(new_image.shape[2])
    # albumentations 2.x returns list-or-ndarray boxes with float noise and float label fields
    new_boxes = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
    index = torch.as_tensor(np.rint(np.asarray(out["index"], dtype=np.float64)), dtype=torch.long)
    new_boxes[:, 0::2] = new_boxes[:, 0::2].clamp(0, new_w)
    new_boxes[:, 1::2] = new_boxes[:, 1::2].clamp(0, new_h)
    valid = (new_boxes[:, 2] > new_boxes[:, 0]) & (new_boxes[:, 3] > new_boxes[:, 1])
    labels = sample.labels[torch.as_tensor(keep, dtype=torch.long)][index]
    return sample.replace(
        image=new_image.contiguous(),
        boxes=new_boxes[valid].contiguous(),
        labels=labels[valid].to(torch.int64),
    )


def _resize_op(height: int, width: int, out_h: int, out_w: int) -> list[A.BasicTransform]:
    if (out_h, out_w) == (height, width):
        return []
    return [A.Resize(height=out_h, width=out_w, area_for_downscale="image")]


class TrainTransform:
    """The DETR / DINO train augmentation on ``Sample`` (see the module docstring).

    Args:
        scales: short-side choices of the final resize (pixels).
        max_size: cap on the long side of the final resize.
        hflip: random horizontal flip with p = 0.5.
        crop: enable the resize -> crop -> resize branch (chosen with p = 0.5).
        crop_scales: short-side choices of the resize before the crop.
        crop_size: ``[min, max]`` crop height / width (each clipped to the image).
        seed: seed of the fallback generator used when ``__call__`` gets no ``rng``.
    """

    def __init__(
        self,
        *,
        scales: Sequence[int],
        max_size: int,
        hflip: bool = True,
        crop: bool = True,
        crop_scales: Sequence[int] = (400, 500, 600),
        crop_size: Sequence[int] = (384, 600),
        seed: int | None = None,
    ) -> None:
        if not scales or min(scales) < 1:
            raise ValueError(f"scales must be non-empty positive ints, got {list(scales)}")
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if crop:
            if not crop_scales or min(crop_scales) < 1:
                raise ValueError(f"crop_scales must be positive ints, got {list(crop_scales)}")
            if len(crop_size) != 2 or not 1 <= crop_size[0] <= crop_size[1]:
                raise ValueError(
                    f"crop_size must be [min, max] with 1 <= min <= max, got {list(crop_size)}"
                )
        self.scales = [int(s) for s in scales]
        self.max_size = int(max_size)
        self.hflip = bool(hflip)
        self.crop = bool(crop)
        self.crop_scales = [int(s) for s in crop_scales]
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self._rng = np.random.default_rng(seed)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        """Augment one sample.

        Args:
            sample: image ``uint8 [3, H, W]``, boxes ``xyxy`` px ``[N, 4]``, labels ``[N]``.
            rng: source of every random choice; the same seed gives the same output.

        Returns:
            The augmented ``Sample`` (``uint8 [3, H', W']``, boxes inside the image, int64
            labels; ``dataset_id``, ``image_id`` and ``orig_size`` unchanged).
        """
        rng = self._rng if rng is None else rng
        h, w = sample.size
        ops: list[A.BasicTransform] = []
        if self.hflip and rng.random() < 0.5:
            ops.append(A.HorizontalFlip(p=1.0))
        if self.crop and rng.random() >= 0.5:
            short = int(self.crop_scales[rng.integers(len(self.crop_scales))])
            rh, rw = resize_shape(h, w, short, None)
            ops += _resize_op(h, w, rh, rw)
            lo, hi = self.crop_size
            ch = int(rng.integers(min(lo, rh, hi), min(rh, hi) + 1))
            cw = int(rng.integers(min(lo, rw, hi), min(rw, hi) + 1))
            y0 = int(rng.integers(0, rh - ch + 1))
            x0 = int(rng.integers(0, rw - cw + 1))
            if (ch, cw) != (rh, rw):
                ops.append(A.Crop(x_min=x0, y_min=y0, x_max=x0 + cw, y_max=y0 + ch))
            h, w = ch, cw
        short = int(self.scales[rng.integers(len(self.scales))])
        ops += _resize_op(h, w, *resize_shape(h, w, short, self.max_size))
        return _apply(sample, ops)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(scales={self.scales}, max_size={self.max_size}, hflip={self.hflip}, "
            f"crop={self.crop}, crop_scales={self.crop_scales}, crop_size={self.crop_size})"
        )


class EvalTransform:
    """Deterministic test resize: short side ``scale``, long side <= ``max_size``.

    Args:
        scale: target short side (pixels).
        max_size: cap on the long side.
    """

    def __init__(self, *, scale: int, max_size: int) -> None:
        if scale < 1 or max_size < 1:
            raise ValueError(f"scale and max_size must be >= 1, got {scale}, {max_size}")
        self.scale = int(scale)
        self.max_size = int(max_size)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        """Resize one sample (``rng`` is ignored; accepted for a uniform call signature)."""
        h, w = sample.size
        return _apply(sample, _resize_op(h, w, *resize_shape(h, w, self.scale, self.max_size)))

    def __repr__(self) -> str:
        return f"EvalTransform(scale={self.scale}, max_size={self.max_size})"


def build_transforms(
    data_cfg: DataConfig, spec: DatasetSpec | None = None, *, train: bool
) -> TrainTransform | EvalTransform:
    """The train or test pipeline of one dataset.

    Args:
        data_cfg: the ``data`` section (scales, max_size, test_scale, crop, hflip, ...).
        spec: the dataset's catalog entry; only read when ``data_cfg.per_dataset_scales`` is on
            (its ``scales`` / ``test_scale`` / ``max_size`` override the shared values when set).
        train: the augmentation pipeline (True) or the test resize (False).
    """
    scales = list(data_cfg.scales)
    max_size = int(data_cfg.max_size)
    test_scale = int(data_cfg.test_scale) or None
    if data_cfg.per_dataset_scales and spec is not None:
        if spec.scales:
            scales = [int(s) for s in spec.scales]
            test_scale = None  # follows the dataset's scales unless it names a test scale
        if spec.max_size:
            max_size = int(spec.max_size)
        if spec.test_scale:
            test_scale = int(spec.test_scale)
    if train:
        return TrainTransform(
            scales=scales,
            max_size=max_size,
            hflip=data_cfg.hflip,
            crop=data_cfg.crop,
            crop_scales=data_cfg.crop_scales,
            crop_size=data_cfg.crop_size,
        )
    return EvalTransform(scale=test_scale or max(scales), max_size=max_size)
