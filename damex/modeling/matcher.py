"""Hungarian (one-to-one) matching of predictions to ground truth, DINO style, and the known
pairs of the denoising queries.

Matching cost (DINO ``models/dino/matcher.py``; docs/design.md §2.1): for query q and GT box j,

    C[q, j] = w_class * (pos(p_qc) - neg(p_qc)) + w_bbox * |b_q - b_j|_1 - w_giou * GIoU(b_q, b_j)

with ``c`` the GT label, ``p = sigmoid(logit)``, ``pos(p) = alpha (1-p)^gamma (-log p)`` and
``neg(p) = (1-alpha) p^gamma (-log(1-p))`` (the focal-loss terms, Lin et al. 2017) and L1 on
normalized ``cxcywh``. The assignment is scipy's ``linear_sum_assignment`` per image, on CPU in
float64.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from damex.modeling.box_ops import generalized_box_iou
from damex.modeling.outputs import DNMeta
from damex.structures import Target, box_cxcywh_to_xyxy

__all__ = ["MatchIndices", "HungarianMatcher", "dn_positive_indices", "dn_slot_mask"]

MatchIndices = tuple[Tensor, Tensor]
"""``(query_idx, gt_idx)``: two ``int64`` ``[M]`` CPU tensors, matched query ``query_idx[m]`` to
GT box ``gt_idx[m]`` of the same image, sorted by query index."""

# -log(p) guard, as in DINO's matcher
_LOG_EPS = 1e-8
# stands in for NaN/inf costs so scipy does not raise "matrix contains invalid numeric entries";
# the loss on such a batch is non-finite anyway and the trainer skips it
_BIG = 1e8


def _empty_indices() -> MatchIndices:
    return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)


class HungarianMatcher(nn.Module):
    """One-to-one (or one-to-k) Hungarian matching with DINO's focal / L1 / GIoU costs.

    Args:
        cost_class: weight of the focal classification cost.
        cost_bbox: weight of the L1 cost on normalized ``cxcywh``.
        cost_giou: weight of the ``-GIoU`` cost.
        focal_alpha: focal loss alpha of the class cost.
        focal_gamma: focal loss gamma of the class cost.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        costs = {"cost_class": cost_class, "cost_bbox": cost_bbox, "cost_giou": cost_giou}
        if any(v < 0 for v in costs.values()) or all(v == 0 for v in costs.values()):
            raise ValueError(f"matching costs must be >= 0 and not all 0, got {costs}")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def cost_matrix(
        self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor
    ) -> Tensor:
        """Matching cost of one image.

        Args:
            logits: ``[Q, K]`` class logits.
            boxes: ``[Q, 4]`` ``cxcywh`` normalized.
            gt_labels: ``int64`` ``[N]``.
            gt_boxes: ``[N, 4]`` ``cxcywh`` normalized.

        Returns:
            ``[Q, N]`` float32 cost (lower is better), on the inputs' device.
        """
        prob = logits.float().sigmoid()[:, gt_labels]  # [Q, N]
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * prob.pow(g) * -(1 - prob + _LOG_EPS).log()
        pos = a * (1 - prob).pow(g) * -(prob + _LOG_EPS).log()
        boxes = boxes.float()
        gt_boxes = gt_boxes.float()
        c_class = pos - neg
        c_bbox = torch.cdist(boxes, gt_boxes, p=1)  # [Q, N]
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes))
        return self.cost_bbox * c_bbox + self.cost_class * c_class + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(
        self, logits: Tensor, boxes: Tensor, targets: list[Target], *, repeat: int = 1
    ) -> list[MatchIndices]:
        """Match every image's queries to its GT boxes.

        Args:
            logits: ``[B, Q, K]`` class logits.
            boxes: ``[B, Q, 4]`` ``cxcywh`` normalized boxes.
            targets: ``B`` targets (``cxcywh`` normalized boxes, labels < K).
            repeat: one-to-many matching (H-DETR): each GT box is repeated ``repeat`` times, so
                up to ``repeat`` queries match it. ``gt_idx`` still indexes the original
                (unrepeated) target.

        Returns:
            ``B`` pairs ``(query_idx, gt_idx)`` of ``int64`` CPU tensors, sorted by query;
            ``min(Q, repeat * N_b)`` pairs for image b (empty when it has no GT).
        """
        if logits.ndim != 3 or boxes.shape != (*logits.shape[:2], 4):
            raise ValueError(
                f"matcher expects logits [B, Q, K] and boxes [B, Q, 4], got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        if len(targets) != logits.shape[0]:
            raise ValueError(f"matcher got {len(targets)} targets for a batch of {logits.shape[0]}")
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        num_queries = logits.shape[1]
        costs: list[Tensor] = []
        for b, tgt in enumerate(targets):
            if tgt.labels.numel() == 0:
                continue
            cost = self.cost_matrix(logits[b], boxes[b], tgt.labels, tgt.boxes)  # [Q, N]
            costs.append(cost.repeat(1, repeat) if repeat > 1 else cost)  # [Q, N*repeat]
        # one device->host copy for the whole batch
        flat = torch.cat([c.reshape(-1) for c in costs]).double().cpu() if costs else None
        out: list[MatchIndices] = []
        offset = 0
        for tgt in targets:
            n = int(tgt.labels.numel())
            if n == 0:
                out.append(_empty_indices())
                continue
            size = num_queries * n * repeat
            cost_np = flat[offset : offset + size].view(num_queries, n * repeat).numpy()
            offset += size
            if not np.isfinite(cost_np).all():
                cost_np = np.nan_to_num(cost_np, nan=_BIG, posinf=_BIG, neginf=-_BIG)
            rows, cols = linear_sum_assignment(cost_np)
            out.append(
                (
                    torch.as_tensor(rows, dtype=torch.long),
                    torch.as_tensor(cols % n, dtype=torch.long),
                )
            )
        return out


def dn_positive_indices(dn_meta: DNMeta) -> list[MatchIndices]:
    """Known pairs of the denoising queries: positive slot i of every group <-> GT box i.

    Args:
        dn_meta: the DN layout (``num_groups`` groups of ``2 * pad_size`` slots; positives first).

    Returns:
        per image ``(query_idx, gt_idx)`` over the DN part of the sequence, ``int64`` CPU,
        ``num_groups * num_gt[b]`` pairs, ordered by group then GT.
    """
    pad, groups = int(dn_meta.pad_size), int(dn_meta.num_groups)
    out: list[MatchIndices] = []
    for n in dn_meta.num_gt.tolist():
        gt = torch.arange(n, dtype=torch.long)
        starts = torch.arange(groups, dtype=torch.long) * (2 * pad)  # [G]
        query = (starts[:, None] + gt[None, :]).reshape(-1)  # [G*n]
        out.append((query, gt.repeat(groups)))
    return out


def dn_slot_mask(dn_meta: DNMeta, *, device: torch.device | str | None = None) -> Tensor:
    """Which DN slots hold a real (positive or negative) query, i.e. are not padding.

    Args:
        dn_meta: the DN layout.
        device: device of the result.

    Returns:
        ``bool`` ``[B, num_groups * 2 * pad_size]``.
    """
    pad, groups = int(dn_meta.pad_size), int(dn_meta.num_groups)
    num_gt = dn_meta.num_gt.to(device=device, dtype=torch.long)
    slot = torch.arange(2 * pad, device=device) % max(pad, 1)  # [2*pad] index within each half
    used = slot[None, :] < num_gt[:, None]  # [B, 2*pad]
    return used.repeat(1, groups)  # [B, G*2*pad]
