"""Box IoU / generalized IoU helpers, numerically guarded for degenerate boxes.

All boxes are ``xyxy`` (any units, the same for both arguments). ``torchvision.ops`` has the
pairwise versions but divides by zero on zero-area boxes (a sigmoid box head can output
``w == 0`` in float32 when a logit saturates), so the matcher's pairwise matrix comes from here.
The losses' paired ("elementwise") GIoU is ``torchvision.ops.generalized_box_iou_loss``, which
takes an ``eps`` (see ``damex/modeling/criterion.py``).
GIoU: Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_area", "generalized_box_iou"]

_EPS = 1e-7


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``[..., 4]`` ``xyxy`` boxes (negative extents count as 0) -> ``[...]``."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(
        min=0
    )


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union of broadcastable ``[..., 4]`` box tensors -> two ``[...]``."""
    lt = torch.maximum(a[..., :2], b[..., :2])  # [..., 2]
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _giou_from(a: Tensor, b: Tensor) -> Tensor:
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=_EPS)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=_EPS)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU.

    Args:
        boxes1: ``[N, 4]`` ``xyxy``.
        boxes2: ``[M, 4]`` ``xyxy``.

    Returns:
        ``[N, M]`` GIoU in ``[-1, 1]``.
    """
    return _giou_from(boxes1[:, None, :], boxes2[None, :, :])  # [N, M]
