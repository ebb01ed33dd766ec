"""Contrastive denoising (CDN) queries of DINO and the decoder self-attention mask.

DINO (Zhang et al. 2022, §3.3; official ``prepare_for_cdn``): every ground-truth box of the batch
is fed to the decoder ``num_groups`` times as a *positive* (small box noise, to be reconstructed)
and a *negative* (larger box noise, to be classified as "no object") query. With ``pad_size`` the
largest GT count of an image in the batch, the DN part of an image's decoder sequence is
``num_groups`` groups of ``2 * pad_size`` slots: positives at ``[2g*pad, 2g*pad + pad)``,
negatives at the next ``pad`` slots (``DNMeta``). Images with fewer boxes leave padding slots
(zero content, anchor box (0.5, 0.5, 0.5, 0.5) as in DINO), tagged ``TokenKind.DN_PAD``.

Noise (official code, kept):

- labels: each DN query's label is replaced, with probability ``label_noise_ratio * 0.5``, by a
  label drawn uniformly over all ``num_classes`` classes (may redraw the same class);
- boxes: each corner ``(x1, y1, x2, y2)`` moves by ``sign * u * (w/2 or h/2) * box_noise_scale``
  with ``u ~ U[0, 1)`` for positives and ``u ~ U[1, 2)`` for negatives, then the box is clipped to
  the image. With ``box_noise_scale <= 1`` a positive's center stays inside its GT box.

Attention mask (True = may not attend), sequence ``[DN (Ndn) | matching (Q) | one-to-many (Q2)]``:
matching queries see only matching queries (they must not see GT-derived queries); a DN group
sees itself (positives and negatives together) and the matching queries, not other groups nor
the one-to-many queries; one-to-many queries see only themselves (H-DETR hybrid branch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from damex.modeling.outputs import DNMeta, TokenKind
from damex.modeling.position import inverse_sigmoid
from damex.structures import Target, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = [
    "DenoisingQueries",
    "prepare_cdn",
    "build_self_attn_mask",
    "noise_labels",
    "noise_boxes",
]


@dataclass
class DenoisingQueries:
    """The DN part of the decoder input.

    Attributes:
        content: ``[B, Ndn, D]`` label embeddings of the (noised) GT labels, zero on padding.
        anchors: ``[B, Ndn, 4]`` inverse-sigmoid of the noised ``cxcywh`` boxes.
        attn_mask: ``bool`` ``[Ndn + Q + Q2, Ndn + Q + Q2]``, True where attention is blocked.
        meta: the layout (``num_groups``, ``pad_size``, ``num_gt``).
        token_kind: ``int64`` ``[B, Ndn]`` ``TokenKind.DN`` or ``TokenKind.DN_PAD``.
    """

    content: Tensor
    anchors: Tensor
    attn_mask: Tensor
    meta: DNMeta
    token_kind: Tensor

    @property
    def num_queries(self) -> int:
        """Ndn = num_groups * 2 * pad_size."""
        return int(self.content.shape[1])


def build_self_attn_mask(
    *,
    num_groups: int,
    pad_size: int,
    num_queries: int,
    num_one_to_many: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Decoder self-attention mask for ``[DN | matching | one-to-many]`` (module docstring).

    Args:
        num_groups: DN groups (0 for none).
        pad_size: slots per half-group.
        num_queries: matching queries Q.
        num_one_to_many: one-to-many queries Q2.
        device: where to build it.

    Returns:
        ``bool`` ``[N, N]`` with N = ``2 * num_groups * pad_size + Q + Q2``; True = blocked.
    """
    num_dn = 2 * num_groups * pad_size
    total = num_dn + num_queries + num_one_to_many
    blocked = torch.ones(total, total, dtype=torch.bool, device=device)
    match = slice(num_dn, num_dn + num_queries)
    blocked[match, match] = False
    for g in range(num_groups):
        group = slice(2 * g * pad_size, 2 * (g + 1) * pad_size)
        blocked[group, group] = False
        blocked[group, match] = False
    o2m = slice(num_dn + num_queries, total)
    blocked[o2m, o2m] = False
    return blocked


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(*shape, generator=generator, device=gen_device).to(device)


def noise_labels(
    labels: Tensor,
    ratio: float,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Replace each label, with probability ``ratio * 0.5``, by a uniform class (DINO).

    Args:
        labels: ``int64`` ``[N]``.
        ratio: DINO's ``dn_label_noise_ratio``.
        num_classes: K (new labels are drawn from ``[0, K)``).
        generator: RNG (None: the global one).

    Returns:
        ``int64`` ``[N]``.
    """
    if ratio <= 0 or labels.numel() == 0:
        return labels.clone()
    flip = _rand((labels.numel(),), generator, labels.device) < ratio * 0.5
    new = (_rand((labels.numel(),), generator, labels.device) * num_classes).long()
    new = new.clamp(max=num_classes - 1)
    return torch.where(flip, new, labels)


def noise_boxes(
    boxes: Tensor,
    negative: Tensor,
    scale: float,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> Tensor:
    """DINO's corner noise: positives move < half the box size, negatives between half and one.

    Args:
        boxes: ``[N, 4]`` ``cxcywh`` normalized.
        negative: ``bool`` ``[N]``.
        scale: ``box_noise_scale`` (<= 0: no noise).
        generator: RNG (None: the global one).
        clip: clip the noised corners to [0, 1] (DINO does).

    Returns:
        ``[N, 4]`` ``cxcywh``.
    """
    if scale <= 0 or boxes.numel() == 0:
        return boxes.clone()
    xyxy = box_cxcywh_to_xyxy(boxes)
    half = boxes[:, 2:].repeat(1, 2) / 2  # [N, 4] (w/2, h/2, w/2, h/2)
    sign = torch.where(_rand(boxes.shape, generator, boxes.device) < 0.5, -1.0, 1.0)
    part = _rand(boxes.shape, generator, boxes.device) + negative[:, None].to(boxes.dtype)
    xyxy = xyxy + sign * part * half * scale
    if clip:
        xyxy = xyxy.clamp(min=0.0, max=1.0)
    return box_xyxy_to_cxcywh(xyxy)


def _flat_targets(
    targets: Sequence[Target], num_gt_list: list[int], num_classes: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The batch's GT as flat tensors on ``device``: labels ``int64 [N]`` (checked to be in
    ``[0, num_classes)``), boxes ``float [N, 4]``, image index ``[N]``, index within its image
    ``[N]``."""
    labels = torch.cat([t.labels for t in targets]).to(device).long()  # [N]
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"GT labels must be in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    boxes = torch.cat([t.boxes for t in targets]).to(device).float()  # [N, 4]
    image = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(num_gt_list)])
    local = torch.cat([torch.arange(n) for n in num_gt_list])
    return labels, boxes, image.to(device), local.to(device)


def _scatter_queries(
    embeds: Tensor,
    anchors_logit: Tensor,
    image: Tensor,
    slot: Tensor,
    *,
    batch_size: int,
    num_dn: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Place the ``M`` noised queries at ``(image, slot)`` of ``[B, num_dn]`` grids.

    Returns:
        content ``[B, num_dn, D]``, anchors ``[B, num_dn, 4]`` (logits) and token kinds
        ``[B, num_dn]`` (``DN`` where a query was placed, ``DN_PAD`` elsewhere).
    """
    device = anchors_logit.device
    content = embeds.new_zeros(batch_size, num_dn, embeds.shape[-1])
    content = content.index_put((image, slot), embeds)  # [B, num_dn, D]
    anchors = torch.zeros(batch_size, num_dn, 4, device=device)
    anchors[image, slot] = anchors_logit
    token_kind = torch.full(
        (batch_size, num_dn), int(TokenKind.DN_PAD), dtype=torch.long, device=device
    )
    token_kind[image, slot] = int(TokenKind.DN)
    return content, anchors, token_kind


def prepare_cdn(
    targets: Sequence[Target],
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
    label_embed: nn.Embedding,
    training: bool,
    *,
    num_queries: int,
    num_one_to_many: int = 0,
    generator: torch.Generator | None = None,
) -> DenoisingQueries | None:
    """Build the contrastive denoising queries of a batch (DINO ``prepare_for_cdn``).

    Args:
        targets: per-image GT (``cxcywh`` normalized, labels < ``num_classes``).
        dn_number: DN budget per polarity (DINO: 100); ``num_groups = dn_number // max_gt``
            (at least 1).
        label_noise_ratio: see ``noise_labels``.
        box_noise_scale: see ``noise_boxes``.
        num_classes: K.
        label_embed: ``nn.Embedding(K + 1, D)`` (DINO's table has one spare row).
        training: DN exists only in training.
        num_queries: matching queries Q (for the attention mask).
        num_one_to_many: one-to-many queries Q2 (for the attention mask).
        generator: RNG for the noise (None: the global one).

    Returns:
        The DN queries, or None when not training, ``dn_number <= 0`` or no image has a GT box.
    """
    if not training or dn_number <= 0 or len(targets) == 0:
        return None
    num_gt_list = [int(t.labels.numel()) for t in targets]
    pad = max(num_gt_list)
    if pad == 0:
        return None
    device = label_embed.weight.device
    groups = max(dn_number // pad, 1)
    labels, boxes, image, local = _flat_targets(targets, num_gt_list, num_classes, device)
    total, reps = labels.numel(), 2 * groups
    # block r = 2g + s of every GT (s = 1: negative) sits at slot r * pad + local index
    labels_rep = labels.repeat(reps)  # [2G*N]
    boxes_rep = boxes.repeat(reps, 1)
    block = torch.arange(reps, device=device).repeat_interleave(total)
    negative = block % 2 == 1
    slot = local.repeat(reps) + block * pad
    image_rep = image.repeat(reps)

    noised_labels = noise_labels(labels_rep, label_noise_ratio, num_classes, generator)
    noised_boxes = noise_boxes(boxes_rep, negative, box_noise_scale, generator)
    content, anchors, token_kind = _scatter_queries(
        label_embed(noised_labels),  # [2G*N, D]
        inverse_sigmoid(noised_boxes),  # [2G*N, 4]
        image_rep,
        slot,
        batch_size=len(targets),
        num_dn=reps * pad,
    )
    mask = build_self_attn_mask(
        num_groups=groups,
        pad_size=pad,
        num_queries=num_queries,
        num_one_to_many=num_one_to_many,
        device=device,
    )
    meta = DNMeta(
        num_groups=groups,
        pad_size=pad,
        num_gt=torch.tensor(num_gt_list, dtype=torch.long, device=device),
    )
    return DenoisingQueries(
        content=content, anchors=anchors, attn_mask=mask, meta=meta, token_kind=token_kind
    )
