"""DINO set criterion (focal / L1 / GIoU on matched pairs; aux, interm, DN, one-to-many and
dense branches) plus the MoE losses computed from ``DetectorOutput.routing``.

Formulas (docs/design.md §2.1, §3):
- class: sigmoid focal loss (alpha, gamma) summed over all (query, class) entries and divided by
  ``num_boxes``. This equals DINO's ``sigmoid_focal_loss(...).mean(1).sum() / num_boxes * Q``.
- boxes: L1 on normalized ``cxcywh`` and ``1 - GIoU``, summed over matched pairs / ``num_boxes``.
- ``num_boxes``: GT boxes in the batch, averaged over processes (all_reduce) and clamped >= 1;
  times ``num_groups`` for DN and times ``k`` for the one-to-many branch.
- MoE: DAMEX cross-entropy between router logits and the image's expert on a token selection, or
  a balance loss (load+importance / Switch) on a token selection, averaged over MoE layers, plus an
  optional router z-loss on all tokens.

The returned dict:
- ``loss_<term><suffix>``: weighted terms (already multiplied by the term weight and the branch
  weight); ``term`` in class / bbox / giou / moe / z. Suffixes: none (final decoder layer),
  ``_<i>`` (aux layer i), ``_interm`` (encoder proposals), ``_dn`` / ``_dn_<i>`` (denoising),
  ``_o2m`` / ``_o2m_<i>`` (one-to-many branch), ``_dense`` (dense auxiliary head).
- ``loss``: the sum of every ``loss_*`` term (what to back-propagate).
- keys with a ``/`` are detached statistics for logging, never summed:
  ``unweighted/loss_{class,bbox,giou,moe,z}`` (final-layer terms before weighting),
  ``stat/num_boxes`` and, with MoE layers, ``stat/route_acc`` (fraction of the DAMEX-selected
  tokens whose top-1 clean logit is the image's expert; over the balance tokens otherwise, with
  images of expert -1 left out). ``SetCriterion.weight_of(key)`` gives the factor of any term.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from damex.config import Config, LogitsSource, MoELoss, choices
from damex.modeling.dense_head import fcos_assign
from damex.modeling.matcher import HungarianMatcher, MatchIndices, dn_positive_indices, dn_slot_mask
from damex.modeling.outputs import DenseOutput, DetectorOutput, Prediction
from damex.modeling.token_selection import TOKEN_MODES, foreground_mask, select_tokens
from damex.moe import losses as moe_losses
from damex.moe.types import RoutingInfo
from damex.structures import Batch, Target, box_cxcywh_to_xyxy

__all__ = [
    "SetCriterion",
    "build_criterion",
    "MOE_LOSSES",
]

logger = logging.getLogger(__name__)

MOE_LOSSES = choices(MoELoss)


# ------------------------------------------------------------------------------ helpers
def _world_mean(value: float, device: torch.device) -> float:
    """Average a per-process count over processes (DETR's ``num_boxes``), clamped >= 1."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        value = float(t.item()) / dist.get_world_size()
    return max(value, 1.0)


def _flat_indices(indices: list[MatchIndices], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(batch_idx, query_idx)`` of all matched pairs, ``[M]`` each, on ``device``."""
    b = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
    q = torch.cat([q for q, _ in indices])
    return b.to(device), q.to(device)


# torchvision adds eps to the IoU and hull denominators; its default 1e-7 moves the GIoU of a box
# 1% of the image wide by ~1e-3. 1e-12 is below float32 rounding for any union over 1e-6 (a
# 1-pixel box in a 1000-pixel image), and two empty boxes still give a finite loss of 1.
_GIOU_EPS = 1e-12


def _giou_loss(src: Tensor, tgt: Tensor) -> Tensor:
    """``1 - GIoU`` of paired normalized ``cxcywh`` boxes: ``[M, 4]`` and ``[M, 4]`` -> ``[M]``."""
    return generalized_box_iou_loss(
        box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt), reduction="none", eps=_GIOU_EPS
    )


def _check_pred(pred: Prediction, batch_size: int, num_classes: int, name: str) -> None:
    lg, bx = pred.logits, pred.boxes
    if lg.ndim != 3 or lg.shape[0] != batch_size or lg.shape[2] != num_classes:
        raise ValueError(
            f"{name}.logits must be [B={batch_size}, N, K={num_classes}], got {tuple(lg.shape)}"
        )
    if bx.shape != (*lg.shape[:2], 4):
        raise ValueError(
            f"{name}.boxes must be [B, N, 4]={(*lg.shape[:2], 4)}, got {tuple(bx.shape)}"
        )


# ----------------------------------------------------------------------------- criterion
def _check_options(
    *,
    num_classes: int,
    moe_loss: str,
    damex_tokens: str,
    balance_tokens: str,
    damex_logits: str,
    one_to_many_k: int,
    moe_schedule: str,
    moe_ramp_frac: float,
    moe_weight_final: float,
    weights: dict[str, float],
) -> None:
    """:class:`SetCriterion`'s argument checks (``ValueError``); ``weights``: name -> loss weight,
    ``moe_weight`` among them."""
    moe_losses.scheduled_weight(  # validates the schedule
        weights["moe_weight"], moe_schedule, 0.0, ramp_frac=moe_ramp_frac, final=moe_weight_final
    )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if moe_loss not in MOE_LOSSES:
        raise ValueError(f"moe_loss must be one of {MOE_LOSSES}, got {moe_loss!r}")
    for name, mode in (("damex_tokens", damex_tokens), ("balance_tokens", balance_tokens)):
        if mode not in TOKEN_MODES:
            raise ValueError(f"{name} must be one of {TOKEN_MODES}, got {mode!r}")
    if damex_logits not in choices(LogitsSource):
        raise ValueError(f"damex_logits must be 'clean' or 'noisy', got {damex_logits!r}")
    if one_to_many_k < 1:
        raise ValueError(f"one_to_many_k must be >= 1, got {one_to_many_k}")
    bad = {k: v for k, v in weights.items() if not (v >= 0 and math.isfinite(v))}
    if bad:
        raise ValueError(f"loss weights must be finite and >= 0, got {bad}")


class SetCriterion(nn.Module):
    """DINO detection losses + MoE losses (see the module docstring for the returned keys).

    Args:
        num_classes: K, the size of the class head (labels must be < K).
        matcher: the Hungarian matcher (used for the final, aux, interm and one-to-many sets).
        class_weight: weight of the focal class loss.
        bbox_weight: weight of the L1 box loss.
        giou_weight: weight of the GIoU loss.
        focal_alpha: focal loss alpha.
        focal_gamma: focal loss gamma.
        aux: also supervise the other decoder layers (and every layer of the DN / one-to-many
            branches); False: final layer only.
        interm_weight: branch weight of the encoder proposals' losses (0 disables).
        dn: supervise the denoising queries when the output has them.
        one_to_many_k: GT repetitions of the one-to-many (H-DETR) branch.
        one_to_many_weight: its branch weight (0 disables).
        dense_weight: branch weight of the dense auxiliary head (0 disables).
        dense_center_radius: FCOS center-sampling radius of the dense head, in strides.
        moe_loss: ``damex``, a balance loss (``load_importance``, ``load_importance_corrected``,
            ``switch``) or ``none``.
        moe_weight: weight of the MoE loss (official 0.1).
        damex_tokens: tokens of the DAMEX loss (``TOKEN_MODES``; official ``all``).
        damex_logits: ``clean`` (official) or ``noisy`` router logits for DAMEX.
        balance_tokens: tokens of a balance loss (official DINO-MoE: ``foreground``).
        z_loss_weight: weight of the router z-loss (all tokens; 0 disables).
        gate_noise: the router's training noise scale (load+importance loss uses it).
        moe_schedule: MoE loss weight over training (``damex.moe.losses.scheduled_weight``:
            ``constant``, ``ramp`` or ``decay``); the trainer calls :meth:`set_progress`.
        moe_ramp_frac: ramp length (fraction of training).
        moe_weight_final: the decay's end weight.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        aux: bool = True,
        interm_weight: float = 1.0,
        dn: bool = True,
        one_to_many_k: int = 6,
        one_to_many_weight: float = 1.0,
        dense_weight: float = 0.0,
        dense_center_radius: float = 1.5,
        moe_loss: str = "damex",
        moe_weight: float = 0.1,
        damex_tokens: str = "all",
        damex_logits: str = "clean",
        balance_tokens: str = "foreground",
        z_loss_weight: float = 0.0,
        gate_noise: float = 1.0,
        moe_schedule: str = "constant",
        moe_ramp_frac: float = 0.25,
        moe_weight_final: float = 0.1,
    ) -> None:
        super().__init__()
        _check_options(
            num_classes=num_classes,
            moe_loss=moe_loss,
            damex_tokens=damex_tokens,
            balance_tokens=balance_tokens,
            damex_logits=damex_logits,
            one_to_many_k=one_to_many_k,
            moe_schedule=moe_schedule,
            moe_ramp_frac=moe_ramp_frac,
            moe_weight_final=moe_weight_final,
            weights={
                "class_weight": class_weight,
                "bbox_weight": bbox_weight,
                "giou_weight": giou_weight,
                "interm_weight": interm_weight,
                "one_to_many_weight": one_to_many_weight,
                "dense_weight": dense_weight,
                "moe_weight": moe_weight,
                "z_loss_weight": z_loss_weight,
            },
        )
        self.num_classes = int(num_classes)
        self.matcher = matcher
        self.term_weights = {"class": class_weight, "bbox": bbox_weight, "giou": giou_weight}
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.aux = bool(aux)
        self.interm_weight = float(interm_weight)
        self.dn = bool(dn)
        self.one_to_many_k = int(one_to_many_k)
        self.one_to_many_weight = float(one_to_many_weight)
        self.dense_weight = float(dense_weight)
        self.dense_center_radius = float(dense_center_radius)
        self.moe_loss = moe_loss
        self.moe_weight = float(moe_weight)  # current weight (moe_weight_base x schedule)
        self.moe_weight_base = float(moe_weight)
        self.moe_schedule = moe_schedule
        self.moe_ramp_frac = float(moe_ramp_frac)
        self.moe_weight_final = float(moe_weight_final)
        if moe_schedule != "constant":
            self.set_progress(0.0)
        self.damex_tokens = damex_tokens
        self.damex_logits = damex_logits
        self.balance_tokens = balance_tokens
        self.z_loss_weight = float(z_loss_weight)
        self.gate_noise = float(gate_noise)
        self._warned_no_routing = False

    # ---------------------------------------------------------------- public helpers
    def set_progress(self, progress: float) -> float:
        """Set the MoE loss weight for ``progress`` (fraction of training done); returns it."""
        self.moe_weight = moe_losses.scheduled_weight(
            self.moe_weight_base,
            self.moe_schedule,
            progress,
            ramp_frac=self.moe_ramp_frac,
            final=self.moe_weight_final,
        )
        return self.moe_weight

    def weight_of(self, key: str) -> float:
        """The factor a ``loss_*`` key was multiplied by (unweighted value = value / factor)."""
        name = key.removeprefix("loss_")
        term, _, suffix = name.partition("_")
        if term == "moe":
            return self.moe_weight
        if term == "z":
            return self.z_loss_weight
        if term not in self.term_weights:
            raise KeyError(f"not a loss term key: {key!r}")
        branch = 1.0
        if suffix.startswith("interm"):
            branch = self.interm_weight
        elif suffix.startswith("o2m"):
            branch = self.one_to_many_weight
        elif suffix.startswith("dense"):
            branch = self.dense_weight
        return self.term_weights[term] * branch

    # ------------------------------------------------------------------ set losses
    def set_losses(
        self,
        pred: Prediction,
        targets: list[Target],
        indices: list[MatchIndices],
        num_boxes: float,
        *,
        slot_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted class / bbox / giou losses of one prediction set.

        Args:
            pred: ``[B, N, K]`` logits and ``[B, N, 4]`` boxes.
            targets: per-image GT.
            indices: per image ``(query_idx, gt_idx)``; matched queries get their GT's class and
                box, every other query the "no object" (all-zero) class target.
            num_boxes: normalizer.
            slot_mask: ``bool`` ``[B, N]``; False slots are left out of the class loss (DN
                padding).

        Returns:
            ``{"class", "bbox", "giou"}`` scalar tensors.
        """
        logits = pred.logits.float()  # [B, N, K]
        device = logits.device
        b_idx, q_idx = _flat_indices(indices, device)
        labels = torch.cat(
            [t.labels[gt.to(t.labels.device)] for t, (_, gt) in zip(targets, indices)]
        )
        gt_boxes = torch.cat(
            [t.boxes[gt.to(t.boxes.device)] for t, (_, gt) in zip(targets, indices)]
        )
        onehot = torch.zeros_like(logits)
        onehot[b_idx, q_idx, labels.to(device)] = 1.0
        focal = sigmoid_focal_loss(
            logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        )  # [B, N, K]
        if slot_mask is not None:
            focal = focal * slot_mask[..., None].to(focal.dtype)
        loss_class = focal.sum() / num_boxes
        src = pred.boxes.float()[b_idx, q_idx]  # [M, 4]
        tgt = gt_boxes.to(device=device, dtype=src.dtype)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        loss_giou = _giou_loss(src, tgt).sum() / num_boxes
        return {"class": loss_class, "bbox": loss_bbox, "giou": loss_giou}

    def _put(
        self, losses: dict[str, Tensor], terms: dict[str, Tensor], suffix: str, branch: float
    ) -> None:
        for term, value in terms.items():
            losses[f"loss_{term}{suffix}"] = value * (self.term_weights[term] * branch)

    # -------------------------------------------------------------------------- forward
    def forward(self, out: DetectorOutput, batch: Batch) -> dict[str, Tensor]:
        """Compute every loss of one batch.

        Args:
            out: the detector's output.
            batch: the batch it was computed on (targets ``cxcywh`` normalized, ``expert_ids``).

        Returns:
            weighted ``loss_*`` terms, their sum under ``loss`` and detached ``unweighted/*`` /
            ``stat/*`` logging values (see the module docstring).
        """
        targets = batch.targets
        bsz = len(targets)
        _check_pred(out.pred, bsz, self.num_classes, "pred")
        device = out.pred.logits.device
        self._check_labels(targets)
        num_local = float(sum(int(t.labels.numel()) for t in targets))
        num_boxes = _world_mean(num_local, device)
        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {"stat/num_boxes": torch.tensor(num_boxes)}

        # final decoder layer
        final_indices = self.matcher(out.pred.logits, out.pred.boxes, targets)
        terms = self.set_losses(out.pred, targets, final_indices, num_boxes)
        self._put(losses, terms, "", 1.0)
        for term, value in terms.items():
            stats[f"unweighted/loss_{term}"] = value.detach()

        if self.aux:
            for i, pred in enumerate(out.aux):
                _check_pred(pred, bsz, self.num_classes, f"aux[{i}]")
                idx = self.matcher(pred.logits, pred.boxes, targets)
                self._put(losses, self.set_losses(pred, targets, idx, num_boxes), f"_{i}", 1.0)

        if out.interm is not None and self.interm_weight > 0:
            _check_pred(out.interm, bsz, self.num_classes, "interm")
            idx = self.matcher(out.interm.logits, out.interm.boxes, targets)
            terms = self.set_losses(out.interm, targets, idx, num_boxes)
            self._put(losses, terms, "_interm", self.interm_weight)

        if self.dn:
            self._dn_losses(out, targets, num_boxes, losses)

        if out.one_to_many and self.one_to_many_weight > 0:
            k = self.one_to_many_k
            for i, pred in self._layers(out.one_to_many):
                _check_pred(pred, bsz, self.num_classes, f"one_to_many[{i}]")
                idx = self.matcher(pred.logits, pred.boxes, targets, repeat=k)
                terms = self.set_losses(pred, targets, idx, num_boxes * k)
                suffix = "_o2m" if i == len(out.one_to_many) - 1 else f"_o2m_{i}"
                self._put(losses, terms, suffix, self.one_to_many_weight)

        if out.dense is not None and self.dense_weight > 0:
            terms = self.dense_losses(out.dense, targets, batch.image_sizes)
            self._put(losses, terms, "_dense", self.dense_weight)

        self._moe_losses(out, batch, final_indices, losses, stats)

        total = torch.stack([v for k, v in losses.items() if k.startswith("loss_")]).sum()
        return {"loss": total, **losses, **stats}

    def _layers(self, preds: list[Prediction]) -> list[tuple[int, Prediction]]:
        """(layer index, prediction) of the decoder layers to supervise (last = final)."""
        pairs = list(enumerate(preds))
        return pairs if self.aux else pairs[-1:]

    def _check_labels(self, targets: list[Target]) -> None:
        labels = [t.labels for t in targets if t.labels.numel() > 0]
        if not labels:
            return
        cat = torch.cat([lb.to(labels[0].device) for lb in labels])
        lo, hi = int(cat.min()), int(cat.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(
                f"target labels must be in [0, num_classes={self.num_classes}), got [{lo}, {hi}]"
            )

    # ------------------------------------------------------------------------- DN
    def _dn_losses(
        self,
        out: DetectorOutput,
        targets: list[Target],
        num_boxes: float,
        losses: dict[str, Tensor],
    ) -> None:
        num_layers = len(out.aux) + 1
        suffixes = [f"_dn_{i}" for i in range(num_layers - 1)] + ["_dn"]
        if not self.aux:
            suffixes = suffixes[-1:]
        meta = out.dn_meta
        if not out.dn or meta is None:
            # constant keys across iterations / processes (DINO does the same)
            zero = out.pred.logits.sum() * 0.0
            for suffix in suffixes:
                for term in self.term_weights:
                    losses[f"loss_{term}{suffix}"] = zero
            return
        expected = int(meta.num_groups) * 2 * int(meta.pad_size)
        if meta.num_gt.tolist() != [int(t.labels.numel()) for t in targets]:
            raise ValueError(
                f"dn_meta.num_gt {meta.num_gt.tolist()} does not match the targets' box counts "
                f"{[int(t.labels.numel()) for t in targets]}"
            )
        indices = dn_positive_indices(meta)
        device = out.pred.logits.device
        slot_mask = dn_slot_mask(meta, device=device)  # [B, G*2*pad]
        num_dn = num_boxes * int(meta.num_groups)
        for i, pred in self._layers(out.dn):
            _check_pred(pred, len(targets), self.num_classes, f"dn[{i}]")
            if pred.logits.shape[1] != expected:
                raise ValueError(
                    f"dn[{i}] has {pred.logits.shape[1]} queries, dn_meta implies {expected} "
                    f"(num_groups={meta.num_groups} * 2 * pad_size={meta.pad_size})"
                )
            terms = self.set_losses(pred, targets, indices, num_dn, slot_mask=slot_mask)
            suffix = "_dn" if i == len(out.dn) - 1 else f"_dn_{i}"
            self._put(losses, terms, suffix, 1.0)

    # ---------------------------------------------------------------------- dense head
    def dense_losses(
        self, dense: DenseOutput, targets: list[Target], image_sizes: Tensor
    ) -> dict[str, Tensor]:
        """Unweighted losses of the dense auxiliary head (FCOS-style assignment, ``fcos_assign``).

        Class: focal loss over valid locations / #positives (one-hot of the assigned GT's
        label, all-zero for negatives). Boxes: L1 + (1 - GIoU) on positives / #positives.
        ``points`` are taken in the boxes' frame (normalized to each image's unpadded size).

        Args:
            dense: the head's outputs.
            targets: per-image GT.
            image_sizes: ``[B, 2]`` unpadded ``(height, width)`` in pixels.

        Returns:
            ``{"class", "bbox", "giou"}`` scalar tensors.
        """
        logits = dense.logits.float()  # [B, S, K]
        bsz, num_loc, _ = logits.shape
        device = logits.device
        points = dense.points if dense.points.ndim == 3 else dense.points[None].expand(bsz, -1, -1)
        onehot = torch.zeros_like(logits)
        pos_b: list[Tensor] = []
        pos_s: list[Tensor] = []
        gt_boxes: list[Tensor] = []
        for b, tgt in enumerate(targets):
            h, w = (float(v) for v in image_sizes[b].tolist())
            scale = torch.tensor([w, h], device=device, dtype=logits.dtype)
            pts_px = points[b].to(device=device, dtype=logits.dtype) * scale  # [S, 2]
            boxes_px = box_cxcywh_to_xyxy(tgt.boxes.to(device).float()) * scale.repeat(2)
            assigned = fcos_assign(
                pts_px,
                dense.strides.to(device),
                dense.valid[b].to(device),
                boxes_px,
                center_radius=self.dense_center_radius,
            )
            pos = torch.nonzero(assigned >= 0).flatten()
            gt = assigned[pos]
            onehot[b, pos, tgt.labels.to(device)[gt]] = 1.0
            pos_b.append(torch.full_like(pos, b))
            pos_s.append(pos)
            gt_boxes.append(tgt.boxes.to(device).float()[gt])
        num_pos = _world_mean(float(sum(p.numel() for p in pos_s)), device)
        focal = sigmoid_focal_loss(
            logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        )
        focal = focal * dense.valid.to(device)[..., None].to(focal.dtype)
        b_idx, s_idx = torch.cat(pos_b), torch.cat(pos_s)
        src = dense.boxes.float()[b_idx, s_idx]  # [P, 4]
        tgt_boxes = torch.cat(gt_boxes)
        return {
            "class": focal.sum() / num_pos,
            "bbox": F.l1_loss(src, tgt_boxes, reduction="sum") / num_pos,
            "giou": _giou_loss(src, tgt_boxes).sum() / num_pos,
        }

    # ---------------------------------------------------------------------------- MoE
    def _moe_losses(
        self,
        out: DetectorOutput,
        batch: Batch,
        final_indices: list[MatchIndices],
        losses: dict[str, Tensor],
        stats: dict[str, Tensor],
    ) -> None:
        routing = out.routing
        wants = self.moe_loss != "none" or self.z_loss_weight > 0
        if not routing:
            if wants and not self._warned_no_routing:
                logger.warning(
                    "criterion: moe_loss=%r but the output has no routing info", self.moe_loss
                )
                self._warned_no_routing = True
            return
        expert_ids = batch.expert_ids.to(routing[0].logits.device)
        num_experts = routing[0].num_experts
        if bool((expert_ids >= num_experts).any()):
            raise ValueError(
                f"batch.expert_ids {expert_ids.tolist()} must be < num_experts={num_experts}"
            )
        mode = self.damex_tokens if self.moe_loss == "damex" else self.balance_tokens
        needs_fg = mode == "foreground"
        fg = foreground_mask(final_indices, out.pred.logits.shape[1]) if needs_fg else None
        masks = [select_tokens(info, mode, fg) for info in routing]

        if self.moe_loss == "damex":
            # images of datasets without an expert (-1) are left out of the DAMEX targets
            masks = [m & (expert_ids[info.token_image] >= 0) for m, info in zip(masks, routing)]
            value = moe_losses.damex_loss(
                routing, expert_ids, token_mask=masks, use_noisy=self.damex_logits == "noisy"
            )
        elif self.moe_loss in ("load_importance", "load_importance_corrected"):
            variant = "tutel" if self.moe_loss == "load_importance" else "corrected"
            value = torch.stack(
                [
                    moe_losses.load_importance_loss(
                        info, token_mask=m, variant=variant, gate_noise=self.gate_noise
                    )
                    for info, m in zip(routing, masks)
                ]
            ).mean()
        elif self.moe_loss == "switch":
            value = torch.stack(
                [moe_losses.switch_loss(info, token_mask=m) for info, m in zip(routing, masks)]
            ).mean()
        else:
            value = None
        if value is not None:
            losses["loss_moe"] = value * self.moe_weight
            stats["unweighted/loss_moe"] = value.detach()
        if self.z_loss_weight > 0:
            z = torch.stack([moe_losses.router_z_loss(info) for info in routing]).mean()
            losses["loss_z"] = z * self.z_loss_weight
            stats["unweighted/loss_z"] = z.detach()
        stats["stat/route_acc"] = self._route_acc(routing, masks, expert_ids)

    @staticmethod
    @torch.no_grad()
    def _route_acc(routing: list[RoutingInfo], masks: list[Tensor], expert_ids: Tensor) -> Tensor:
        hits, count = 0.0, 0.0
        for info, m in zip(routing, masks):
            target = expert_ids[info.token_image]  # [T]
            sel = m & (target >= 0)
            hits += float((info.logits.argmax(-1) == target)[sel].sum())
            count += float(sel.sum())
        return torch.tensor(hits / count if count > 0 else float("nan"))


# --------------------------------------------------------------------------------- build
def build_criterion(cfg: Config, num_classes: int) -> SetCriterion:
    """The criterion of a run: ``cfg.model.loss`` / ``dn`` / ``accel`` and ``cfg.moe``.

    The MoE loss is ``none`` when no decoder layer is MoE (``cfg.uses_moe`` is False).
    """
    loss = cfg.model.loss
    accel = cfg.model.accel
    matcher = HungarianMatcher(
        cost_class=loss.match_class,
        cost_bbox=loss.match_bbox,
        cost_giou=loss.match_giou,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
    )
    return SetCriterion(
        num_classes=num_classes,
        matcher=matcher,
        class_weight=loss.class_weight,
        bbox_weight=loss.bbox_weight,
        giou_weight=loss.giou_weight,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
        aux=loss.aux,
        interm_weight=loss.interm_weight,
        dn=cfg.model.dn.enabled,
        one_to_many_k=accel.one_to_many_k,
        one_to_many_weight=accel.one_to_many_weight if accel.one_to_many else 0.0,
        dense_weight=accel.dense_head_weight if accel.dense_head else 0.0,
        moe_loss=cfg.moe.loss if cfg.uses_moe else "none",
        moe_weight=cfg.moe.loss_weight,
        damex_tokens=cfg.moe.damex_tokens,
        damex_logits=cfg.moe.damex_logits,
        balance_tokens=cfg.moe.balance_tokens,
        z_loss_weight=cfg.moe.z_loss_weight if cfg.uses_moe else 0.0,
        gate_noise=cfg.moe.gate_noise,
        moe_schedule=cfg.moe.loss_schedule,
        moe_ramp_frac=cfg.moe.loss_ramp_frac,
        moe_weight_final=cfg.moe.loss_weight_final,
    )
