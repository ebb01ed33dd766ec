"""Model output -> per-image ``Detections`` in pixels of the original image (DINO ``PostProcess``).

DINO takes the top ``num_select`` (query, class) pairs over all Q x K sigmoid scores, with no NMS
(docs/design.md §2.1, §5). Optionally (an oracle that uses the dataset identity, reported
separately) the
scores of classes outside the image's dataset slice are removed before the top-K.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from damex.config import Config
from damex.modeling.outputs import Prediction, TokenKind
from damex.moe.types import RoutingInfo
from damex.structures import Detections, denormalize_boxes

__all__ = [
    "PostProcess",
    "build_postprocess",
    "dataset_label_matrix",
    "router_label_mask",
    "router_masked_detections",
]


def dataset_label_matrix(label_space: Any) -> Tensor:
    """``bool [D, K]``: True where unified label k belongs to dataset d (a ``LabelSpace``)."""
    out = torch.zeros(label_space.num_datasets, label_space.num_classes, dtype=torch.bool)
    for d in range(label_space.num_datasets):
        out[d, label_space.dataset_slice(d)] = True
    return out


def router_label_mask(
    routing: list[RoutingInfo],
    expert_of_dataset: Tensor,
    dataset_labels: Tensor,
    batch_size: int,
) -> Tensor:
    """Per image, the labels of the dataset(s) its router votes for (``eval.label_mask=router``).

    Every matching query of every MoE layer casts one vote, its top-1 expert; a dataset's score is
    the number of votes for its expert (``expert_of_dataset``), and the image keeps the label
    blocks of the best-scoring datasets (ties, e.g. datasets that share an expert, keep all of
    them). No dataset id is used: this is DAMEX's router acting as a domain classifier. An image
    whose votes all go to experts no dataset maps to keeps every label.

    Args:
        routing: one ``RoutingInfo`` per MoE layer of one forward pass (tokens tagged with
            ``token_kind``; untagged layers vote with every token).
        expert_of_dataset: ``int64 [D]`` expert of every dataset id (all >= 0).
        dataset_labels: ``bool [D, K]``, True where unified label k belongs to dataset d.
        batch_size: ``B``.

    Returns:
        ``bool [B, K]``.
    """
    if not routing:
        raise ValueError("router_label_mask needs the routing of at least one MoE layer")
    if bool((expert_of_dataset < 0).any()):
        raise ValueError("router_label_mask needs an expert for every dataset (moe.expert_map)")
    device = routing[0].expert.device
    votes = torch.zeros(batch_size, routing[0].num_experts, device=device)  # [B, E]
    for info in routing:
        voting = torch.ones_like(info.token_image, dtype=torch.bool)  # [T]
        if info.token_kind is not None:
            voting = info.token_kind.to(device) == TokenKind.MATCHING
        ones = torch.ones(int(voting.sum()), device=device)
        votes.index_put_((info.token_image[voting], info.expert[voting, 0]), ones, accumulate=True)
    score = votes[:, expert_of_dataset.to(device)]  # [B, D]
    best = score.max(dim=1, keepdim=True).values  # [B, 1]
    chosen = (score == best) & (best > 0)  # [B, D]
    chosen[~chosen.any(dim=1)] = True  # no vote for a mapped expert: every dataset
    return (chosen.float() @ dataset_labels.to(device).float()) > 0  # [B, K]


def router_masked_detections(
    out: Any,
    batch_orig_sizes: Tensor,
    *,
    num_select: int,
    expert_of_dataset: Tensor,
    dataset_labels: Tensor,
) -> list[Detections]:
    """Top-``num_select`` detections of each image among its router's voted labels
    (:func:`router_label_mask`); ``out`` is the detector's output (``pred``, ``routing``)."""
    if not out.routing:
        raise ValueError("label_mask=router needs a model with MoE layers")
    bsz = int(out.pred.logits.shape[0])
    masks = router_label_mask(out.routing, expert_of_dataset, dataset_labels, batch_size=bsz)
    pp = PostProcess(num_select=num_select, restrict_to_dataset_labels=True)
    return pp(out.pred, batch_orig_sizes, list(masks))


class PostProcess(nn.Module):
    """Top-K (query, class) selection and box rescaling.

    Args:
        num_select: detections kept per image (at most ``Q * K``, or the number of allowed
            (query, class) pairs under the restriction).
        restrict_to_dataset_labels: keep only classes of the image's dataset slice (needs
            ``dataset_slices`` at call time).
    """

    def __init__(self, *, num_select: int = 300, restrict_to_dataset_labels: bool = False) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"num_select must be >= 1, got {num_select}")
        self.num_select = int(num_select)
        self.restrict_to_dataset_labels = bool(restrict_to_dataset_labels)

    @staticmethod
    def _allowed(slices: list[Tensor], num_classes: int, device: torch.device) -> Tensor:
        """``bool`` ``[B, K]`` from per-image label index lists or ``[K]`` bool masks."""
        rows = []
        for b, s in enumerate(slices):
            s = torch.as_tensor(s, device=device)
            if s.dtype == torch.bool:
                if s.shape != (num_classes,):
                    raise ValueError(
                        f"dataset_slices[{b}] as a mask must be [K={num_classes}], "
                        f"got {tuple(s.shape)}"
                    )
                rows.append(s)
                continue
            s = s.long().flatten()
            if s.numel() and (int(s.min()) < 0 or int(s.max()) >= num_classes):
                raise ValueError(
                    f"dataset_slices[{b}] labels must be in [0, {num_classes}), "
                    f"got [{int(s.min())}, {int(s.max())}]"
                )
            row = torch.zeros(num_classes, dtype=torch.bool, device=device)
            row[s] = True
            rows.append(row)
        return torch.stack(rows)

    @torch.no_grad()
    def forward(
        self,
        out_pred: Prediction,
        batch_orig_sizes: Tensor,
        dataset_slices: list[Tensor] | None = None,
    ) -> list[Detections]:
        """Select detections.

        Args:
            out_pred: ``[B, Q, K]`` logits and ``[B, Q, 4]`` ``cxcywh`` boxes normalized to the
                unpadded image (which is the original image up to scale).
            batch_orig_sizes: ``[B, 2]`` original ``(height, width)`` in pixels.
            dataset_slices: per image, the unified labels of its dataset (``int64`` indices or a
                ``bool`` ``[K]`` mask); used only when ``restrict_to_dataset_labels``.

        Returns:
            ``B`` ``Detections`` sorted by descending score: ``xyxy`` boxes in original-image
            pixels clamped to the image, sigmoid scores, labels, and the query each came from.
        """
        logits, boxes = out_pred.logits, out_pred.boxes
        if logits.ndim != 3 or boxes.shape != (*logits.shape[:2], 4):
            raise ValueError(
                f"postprocess expects logits [B, Q, K] and boxes [B, Q, 4], got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        bsz, num_queries, num_classes = logits.shape
        if tuple(batch_orig_sizes.shape) != (bsz, 2):
            raise ValueError(
                f"batch_orig_sizes must be [B={bsz}, 2], got {tuple(batch_orig_sizes.shape)}"
            )
        scores = logits.float().sigmoid()  # [B, Q, K]
        allowed = None
        if self.restrict_to_dataset_labels:
            if dataset_slices is None or len(dataset_slices) != bsz:
                got = None if dataset_slices is None else len(dataset_slices)
                raise ValueError(
                    f"restrict_to_dataset_labels needs {bsz} dataset_slices, got {got}"
                )
            allowed = self._allowed(dataset_slices, num_classes, logits.device)  # [B, K]
            scores = scores.masked_fill(~allowed[:, None, :], -1.0)  # below any sigmoid
        k = min(self.num_select, num_queries * num_classes)
        top_scores, top_idx = scores.flatten(1).topk(k, dim=1)  # [B, k]
        query = torch.div(top_idx, num_classes, rounding_mode="floor")  # [B, k]
        labels = top_idx % num_classes
        sel_boxes = torch.gather(boxes.float(), 1, query[..., None].expand(-1, -1, 4))  # [B, k, 4]
        sizes = batch_orig_sizes.to(device=sel_boxes.device, dtype=sel_boxes.dtype)
        h, w = sizes[:, 0:1], sizes[:, 1:2]  # [B, 1]
        xyxy = denormalize_boxes(sel_boxes, h, w)  # [B, k, 4]
        upper = torch.stack((w, h, w, h), dim=-1)  # [B, 1, 4]
        xyxy = torch.minimum(xyxy.clamp(min=0), upper)
        results = []
        for b in range(bsz):
            keep = top_scores[b] >= 0  # drops the masked-out pairs under the restriction
            results.append(
                Detections(
                    boxes=xyxy[b][keep],
                    scores=top_scores[b][keep],
                    labels=labels[b][keep],
                    query_index=query[b][keep],
                )
            )
        return results


def build_postprocess(cfg: Config) -> PostProcess:
    """The post-processor of a run (``cfg.eval.num_select``, ``restrict_to_dataset_labels``)."""
    return PostProcess(
        num_select=cfg.eval.num_select,
        restrict_to_dataset_labels=cfg.eval.restrict_to_dataset_labels,
    )
