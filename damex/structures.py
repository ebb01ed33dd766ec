"""Data structures that flow between the data pipeline, the model and evaluation.

Conventions (docs/design.md §10):
- boxes are ``xyxy`` absolute pixels at the data boundary (``Sample``) and in predictions
  (``Detections``); ``cxcywh`` normalized to the unpadded image size inside the model and the
  criterion (``Target``). Convert only with the functions in this module.
- labels are 0-based unified indices (see ``damex.data.label_space.LabelSpace``).
- images are RGB ``uint8`` ``[3, H, W]`` in ``Sample``; ``Batch.images`` is ``float32`` in
  ``[0, 255]``, zero padded; the model normalizes (pixel mean/std buffers).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = [
    "Sample",
    "Target",
    "Batch",
    "Detections",
    "box_xyxy_to_cxcywh",
    "box_cxcywh_to_xyxy",
    "normalize_boxes",
    "denormalize_boxes",
]


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x1, y1, x2, y2) -> (cx, cy, w, h), same units."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> (x1, y1, x2, y2), same units."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def normalize_boxes(boxes_xyxy_abs: Tensor, height: int, width: int) -> Tensor:
    """Absolute-pixel ``xyxy`` ``[N, 4]`` -> ``cxcywh`` normalized by (width, height)."""
    scale = boxes_xyxy_abs.new_tensor([width, height, width, height])
    return box_xyxy_to_cxcywh(boxes_xyxy_abs) / scale


def denormalize_boxes(
    boxes_cxcywh_norm: Tensor, height: Tensor | float, width: Tensor | float
) -> Tensor:
    """Normalized ``cxcywh`` ``[..., 4]`` -> absolute ``xyxy`` pixels of an image (height, width).

    ``height``/``width`` may be tensors broadcastable to ``boxes[..., 0]`` (e.g. ``[B, 1]``).
    """
    xyxy = box_cxcywh_to_xyxy(boxes_cxcywh_norm)
    w = torch.as_tensor(width, dtype=xyxy.dtype, device=xyxy.device)
    h = torch.as_tensor(height, dtype=xyxy.dtype, device=xyxy.device)
    scale = torch.stack((w, h, w, h), dim=-1)
    return xyxy * scale


@dataclass
class Sample:
    """One image with its annotations, as the dataset (and the transforms) yield it.

    Attributes:
        image: ``uint8`` ``[3, H, W]`` RGB.
        boxes: ``float32`` ``[N, 4]`` ``xyxy`` absolute pixels of ``image``.
        labels: ``int64`` ``[N]`` unified label indices.
        dataset_id: index of the dataset in the run's ordered dataset list.
        image_id: the image id in the dataset's COCO JSON.
        orig_size: ``(height, width)`` of the image file, before any transform.
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    dataset_id: int
    image_id: int
    orig_size: tuple[int, int]

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[0] != 3:
            raise ValueError(f"Sample.image must be [3, H, W], got {tuple(self.image.shape)}")
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"Sample.boxes must be [N, 4], got {tuple(self.boxes.shape)}")
        if self.labels.shape != (self.boxes.shape[0],):
            raise ValueError(
                f"Sample.labels must be [N]={self.boxes.shape[0]}, got {tuple(self.labels.shape)}"
            )

    @property
    def size(self) -> tuple[int, int]:
        """Current ``(height, width)`` of ``image``."""
        return int(self.image.shape[1]), int(self.image.shape[2])

    def replace(self, **changes: object) -> Sample:
        return replace(self, **changes)


@dataclass
class Target:
    """Ground truth of one image inside the model / criterion.

    Attributes:
        boxes: ``float32`` ``[N, 4]`` ``cxcywh`` normalized to the unpadded image size.
        labels: ``int64`` ``[N]`` unified label indices.
    """

    boxes: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> Target:
        return Target(self.boxes.to(device), self.labels.to(device))


@dataclass
class Batch:
    """A padded batch (DETR's NestedTensor plus the dataset identity of every image).

    Attributes:
        images: ``float32`` ``[B, 3, H, W]`` in ``[0, 255]``, zero padded at right/bottom.
        mask: ``bool`` ``[B, H, W]``, True on padding.
        targets: one ``Target`` per image.
        dataset_ids: ``int64`` ``[B]`` dataset index of every image (training / evaluation only;
            never used for inference routing).
        expert_ids: ``int64`` ``[B]`` expert mapped to the image's dataset, ``-1`` if no map.
        image_ids: ``int64`` ``[B]`` image id in the dataset's JSON.
        image_sizes: ``int64`` ``[B, 2]`` unpadded ``(height, width)`` after transforms.
        orig_sizes: ``int64`` ``[B, 2]`` ``(height, width)`` of the original image files.
    """

    images: Tensor
    mask: Tensor
    targets: list[Target]
    dataset_ids: Tensor
    expert_ids: Tensor
    image_ids: Tensor
    image_sizes: Tensor
    orig_sizes: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            targets=[t.to(device) for t in self.targets],
            dataset_ids=self.dataset_ids.to(device),
            expert_ids=self.expert_ids.to(device),
            image_ids=self.image_ids.to(device),
            image_sizes=self.image_sizes.to(device),
            orig_sizes=self.orig_sizes.to(device),
        )


@dataclass
class Detections:
    """Predictions for one image, in pixels of the original image file.

    Attributes:
        boxes: ``float32`` ``[N, 4]`` ``xyxy`` absolute pixels.
        scores: ``float32`` ``[N]``.
        labels: ``int64`` ``[N]`` unified label indices.
        query_index: ``int64`` ``[N]`` index of the decoder (matching) query that made each box;
            used to colour boxes by the expert that query was routed to.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    query_index: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to(self, device: torch.device | str) -> Detections:
        return Detections(
            self.boxes.to(device),
            self.scores.to(device),
            self.labels.to(device),
            self.query_index.to(device),
        )
