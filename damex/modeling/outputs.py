"""The detector's output structure: everything the criterion, postprocess and routing
statistics need, as plain tensors (no closures, docs/design.md §9).

Shapes: B images, Q matching queries, K classes (``LabelSpace.num_classes``), L decoder layers.
Boxes are ``cxcywh`` normalized to each image's unpadded size, after sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from torch import Tensor

from damex.moe.types import RoutingInfo

__all__ = ["TokenKind", "Prediction", "DNMeta", "DenseOutput", "DetectorOutput"]


class TokenKind(IntEnum):
    """Tag of a decoder token, stored in ``RoutingInfo.token_kind``."""

    MATCHING = 0  # one of the Q matching (one-to-one) queries
    DN = 1  # a contrastive-denoising query built from a real ground-truth box
    DN_PAD = 2  # a denoising slot padding an image with fewer boxes than the batch maximum
    ONE_TO_MANY = 3  # a training-only one-to-many (H-DETR) query


@dataclass
class Prediction:
    """Class logits and boxes of one set of queries.

    Attributes:
        logits: ``[B, N, K]`` pre-sigmoid class logits.
        boxes: ``[B, N, 4]`` ``cxcywh`` normalized.
    """

    logits: Tensor
    boxes: Tensor


@dataclass
class DNMeta:
    """Layout of the denoising queries (DINO ``prepare_for_cdn``).

    The DN part of the decoder sequence is ``num_groups`` groups of ``2 * pad_size`` queries; in
    group g, slots ``[2g*pad, 2g*pad + pad)`` are positives (noised GT box i at slot i) and the
    next ``pad`` slots are the negatives of the same GT boxes. Image b uses the first
    ``num_gt[b]`` slots of each half; the rest are padding.

    Attributes:
        num_groups: number of DN groups.
        pad_size: max number of GT boxes in an image of the batch.
        num_gt: ``int64`` ``[B]`` number of GT boxes per image.
    """

    num_groups: int
    pad_size: int
    num_gt: Tensor


@dataclass
class DenseOutput:
    """Per-location predictions of the training-only dense auxiliary head (Co-DETR style).

    Attributes:
        logits: ``[B, S, K]`` class logits at every multi-scale location (S locations).
        boxes: ``[B, S, 4]`` ``cxcywh`` normalized boxes.
        points: ``[S, 2]`` or ``[B, S, 2]`` normalized ``(x, y)`` location centers.
        strides: ``[S]`` the stride (in pixels) of each location's level.
        valid: ``bool`` ``[B, S]`` False at padded locations.
    """

    logits: Tensor
    boxes: Tensor
    points: Tensor
    strides: Tensor
    valid: Tensor


@dataclass
class DetectorOutput:
    """Everything the detector returns for a ``Batch``.

    Attributes:
        pred: final decoder layer, matching queries: ``[B, Q, K]`` / ``[B, Q, 4]``.
        aux: the other decoder layers (first to second last), same shapes as ``pred``.
        interm: the encoder's two-stage proposals (top-Q), or None without two-stage.
        dn: per decoder layer, predictions of the DN queries ``[B, num_groups*2*pad, ...]``, or
            an empty list when no denoising happened (eval, or no GT in the batch).
        dn_meta: layout of the DN queries, or None.
        one_to_many: per decoder layer, predictions of the one-to-many queries, or empty.
        dense: dense auxiliary head outputs, or None.
        routing: one ``RoutingInfo`` per MoE decoder layer, in layer order, with
            ``token_kind`` / ``token_query`` set.
    """

    pred: Prediction
    aux: list[Prediction] = field(default_factory=list)
    interm: Prediction | None = None
    dn: list[Prediction] = field(default_factory=list)
    dn_meta: DNMeta | None = None
    one_to_many: list[Prediction] = field(default_factory=list)
    dense: DenseOutput | None = None
    routing: list[RoutingInfo] = field(default_factory=list)
