"""Training-only dense auxiliary head on the encoder memory (Co-DETR style, Zong et al. 2023).

Every valid location of the multi-scale encoder output predicts class logits and an FCOS-style
box (Tian et al. 2019): distances ``(l, t, r, b) = exp(delta) * stride`` from the location's centre,
in pixels, decoded to a ``cxcywh`` box normalized by the image's unpadded size. The criterion
assigns positives FCOS-style from ``points`` / ``strides`` / GT; the loss flows into the encoder,
which is what speeds up convergence. The head is not run at inference (zero cost).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from damex.modeling.outputs import DenseOutput
from damex.modeling.transformer import MLP
from damex.structures import box_xyxy_to_cxcywh

__all__ = ["DenseHead", "fcos_assign", "location_points"]

_MAX_LOG_DIST = math.log(1e4)  # exp overflow guard (bf16 / fp16)


def location_points(
    spatial_shapes: Sequence[tuple[int, int]], strides: Sequence[int], valid_hw: Tensor
) -> tuple[Tensor, Tensor]:
    """Pixel centres of every location, normalized by each image's unpadded size.

    Args:
        spatial_shapes: per-level ``(H, W)``.
        strides: per-level stride in pixels.
        valid_hw: ``[B, 2]`` unpadded ``(h, w)`` in pixels.

    Returns:
        (``[B, S, 2]`` normalized ``(x, y)``, ``[S]`` stride of each location).
    """
    device = valid_hw.device
    pts, strd = [], []
    for (h, w), s in zip(spatial_shapes, strides):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        pts.append(torch.stack(((xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s), -1))
        strd.append(torch.full((h * w,), float(s), device=device))
    points_px = torch.cat(pts, 0)  # [S, 2]
    scale = valid_hw.flip(-1).float().clamp(min=1.0)  # [B, 2] (w, h)
    return points_px[None] / scale[:, None], torch.cat(strd, 0)


class DenseHead(nn.Module):
    """Shared per-location class + FCOS box head.

    Args:
        d_model: memory width.
        num_classes: K.
        strides: per-level stride in pixels (the neck's).
        num_layers: layers of each branch MLP.
        prior_prob: focal-loss prior of the class bias.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_classes: int,
        strides: Sequence[int],
        num_layers: int = 2,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.strides = [int(s) for s in strides]
        self.cls = MLP(
            in_dim=d_model, hidden_dim=d_model, out_dim=num_classes, num_layers=num_layers
        )
        self.reg = MLP(in_dim=d_model, hidden_dim=d_model, out_dim=4, num_layers=num_layers)
        nn.init.constant_(self.cls.layers[-1].bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.reg.layers[-1].weight)
        nn.init.zeros_(self.reg.layers[-1].bias)  # start at 1-stride distances: 2x2-stride boxes

    def forward(
        self,
        memory: Tensor,
        memory_padding_mask: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        valid_hw: Tensor,
    ) -> DenseOutput:
        """Predict at every location.

        Args:
            memory: ``[B, S, D]``.
            memory_padding_mask: ``bool`` ``[B, S]``.
            spatial_shapes: per-level ``(H, W)``.
            valid_hw: ``[B, 2]`` unpadded ``(h, w)`` in pixels.

        Returns:
            ``DenseOutput`` with ``points`` ``[B, S, 2]``.
        """
        if len(spatial_shapes) != len(self.strides):
            raise ValueError(
                f"DenseHead has {len(self.strides)} strides, the memory "
                f"{len(spatial_shapes)} levels"
            )
        points, strides = location_points(spatial_shapes, self.strides, valid_hw)
        logits = self.cls(memory)  # [B, S, K]
        dist = self.reg(memory).float().clamp(max=_MAX_LOG_DIST).exp() * strides[None, :, None]
        scale = valid_hw.flip(-1).float().clamp(min=1.0).repeat(1, 2)[:, None]  # [B, 1, 4]
        center = points.repeat(1, 1, 2)  # [B, S, 4] (x, y, x, y) normalized
        sign = dist.new_tensor([-1.0, -1.0, 1.0, 1.0])
        xyxy = center + sign * dist / scale  # ltrb -> corners, normalized
        return DenseOutput(
            logits=logits,
            boxes=box_xyxy_to_cxcywh(xyxy),
            points=points,
            strides=strides,
            valid=~memory_padding_mask,
        )


def fcos_assign(
    points: Tensor,
    strides: Tensor,
    valid: Tensor,
    gt_boxes_xyxy: Tensor,
    *,
    center_radius: float = 1.5,
) -> Tensor:
    """FCOS-style positive assignment of locations to GT boxes (Tian et al. 2019), one image.

    A location is a candidate for a GT box when it lies inside the box, within
    ``center_radius * stride`` of the box center (center sampling) and the box's largest
    regression distance ``max(l, t, r, b)`` is in its level's range: ``[4s, 8s]`` for stride s
    (FCOS: 0-64 at s=8, 64-128 at s=16, ...), open-ended at the smallest and largest stride.
    Ties go to the GT box of smallest area. A GT box with no candidate gets the nearest valid
    unassigned location (so tiny boxes are never left unsupervised).

    Args:
        points: ``[S, 2]`` location centers ``(x, y)`` in pixels.
        strides: ``[S]`` stride of each location's level, in pixels.
        valid: ``bool`` ``[S]``.
        gt_boxes_xyxy: ``[N, 4]`` in pixels.
        center_radius: center-sampling radius in strides.

    Returns:
        ``int64`` ``[S]``: the assigned GT index, -1 for negatives.
    """
    num_loc = points.shape[0]
    assigned = torch.full((num_loc,), -1, dtype=torch.long, device=points.device)
    if gt_boxes_xyxy.shape[0] == 0 or num_loc == 0:
        return assigned
    px, py = points[:, 0:1], points[:, 1:2]  # [S, 1]
    x1, y1, x2, y2 = gt_boxes_xyxy.unbind(-1)  # [N]
    ltrb = torch.stack((px - x1, py - y1, x2 - px, y2 - py), dim=-1)  # [S, N, 4]
    inside = ltrb.amin(-1) > 0
    stride = strides.to(points.dtype)[:, None]  # [S, 1]
    radius = center_radius * stride
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    central = ((px - cx).abs() < radius) & ((py - cy).abs() < radius)  # [S, N]
    levels = torch.unique(strides)
    lo = torch.where(strides == levels.min(), torch.zeros_like(stride[:, 0]), 4 * stride[:, 0])
    hi = torch.where(strides == levels.max(), torch.full_like(lo, math.inf), 8 * stride[:, 0])
    reach = ltrb.amax(-1)  # [S, N]
    in_range = (reach >= lo[:, None]) & (reach <= hi[:, None])
    cand = inside & central & in_range & valid[:, None]
    area = ((x2 - x1) * (y2 - y1))[None, :].expand(num_loc, -1)  # [S, N]
    cost = torch.where(cand, area, torch.full_like(area, math.inf))
    best_cost, best_gt = cost.min(dim=1)  # [S]
    has = torch.isfinite(best_cost)
    assigned[has] = best_gt[has]
    # fallback for GT boxes without a single candidate: nearest valid free location
    covered = torch.zeros(gt_boxes_xyxy.shape[0], dtype=torch.bool, device=points.device)
    covered[assigned[has]] = True
    for j in torch.nonzero(~covered).flatten().tolist():
        dist2 = (px[:, 0] - cx[j]) ** 2 + (py[:, 0] - cy[j]) ** 2  # [S]
        dist2 = torch.where(valid & (assigned < 0), dist2, torch.full_like(dist2, math.inf))
        k = int(dist2.argmin())
        if math.isfinite(float(dist2[k])):
            assigned[k] = j
    return assigned
