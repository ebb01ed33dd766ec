"""DINO's deformable transformer: encoder, two-stage query selection, decoder with per-layer FFN.

Structure (DINO, Zhang et al. 2022; Deformable DETR, Zhu et al. 2021; docs/design.md §2.1-§2.3):

- encoder: ``enc_layers`` x [deformable self-attention over all levels -> add & LayerNorm ->
  ReLU FFN -> add & LayerNorm] (post-norm). ``enc_layers = 0`` passes the neck features through.
- two-stage "standard": every encoder location proposes a box (its cell, size 0.05 * 2^level);
  ``enc_output`` Linear + LayerNorm, then a class head and a box head that are *not* shared with
  the decoder; the top-Q locations by max class logit give the decoder's anchors (detached). The
  selected predictions are returned for the "interm" loss. Padded and out-of-range locations are
  never selected (DINO can select them; excluding them makes outputs independent of padding).
- mixed query selection: content queries are learned embeddings (``embed_init_tgt``).
- decoder: ``dec_layers`` x [self-attention (MHA, with the DN / one-to-many mask) -> add & LN ->
  deformable cross-attention around the reference box -> add & LN -> FFN sub-block]. The FFN
  sub-block is injected (house rule 3): ``FFN`` (dense, post-norm) or ``MoEBlock`` (pre-norm,
  ``x + DropPath(MoE(LN(x)))``, no norm after; docs/design.md §2.3).
- iterative box refinement with "look forward twice": layer i predicts
  ``sigmoid(box_head(norm(h_i)) + logit(ref_i))`` where ``ref_i`` is the previous layer's
  refined box *with* gradient, while the reference used for sampling is detached between layers.
  Class and box heads are shared by all decoder layers.
- query position: ``ref_point_head(sine(ref box))``. DINO embeds the box after scaling it by the
  level-0 valid ratio (padded coordinates); we embed the box in image coordinates so the query
  position does not depend on the batch's padding.

DropPath (docs/design.md Q14): one keep/drop draw per (image, query) token, not per query index
shared across the batch as in the official query-major code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import stochastic_depth

from damex.modeling.deform_attn import MSDeformAttn
from damex.modeling.denoising import DenoisingQueries, build_self_attn_mask
from damex.modeling.outputs import Prediction, TokenKind
from damex.modeling.position import inverse_sigmoid, sine_box_embedding, sine_position_embedding
from damex.moe.types import RoutingInfo

__all__ = [
    "MLP",
    "ClassHead",
    "BoxHead",
    "drop_path",
    "TokenTags",
    "FFN",
    "MoEBlock",
    "EncoderLayer",
    "DeformableEncoder",
    "DecoderLayer",
    "DeformableDecoder",
    "DecoderOutput",
    "TransformerOutput",
    "DeformableTransformer",
    "encoder_reference_points",
    "valid_ratios_from_masks",
    "encoder_proposals",
]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _activation(name: str):  # noqa: ANN202
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (DETR's box MLP).

    Args:
        in_dim: input features.
        hidden_dim: hidden features.
        out_dim: output features.
        num_layers: number of Linear layers (>= 1).
    """

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in_dim]`` -> ``[..., out_dim]``."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class ClassHead(nn.Linear):
    """Linear class head with the focal-loss prior bias ``-log((1 - p) / p)``, p = 0.01."""

    def __init__(self, *, d_model: int, num_classes: int, prior_prob: float = 0.01) -> None:
        super().__init__(d_model, num_classes)
        nn.init.constant_(self.bias, -math.log((1 - prior_prob) / prior_prob))


class BoxHead(MLP):
    """3-layer box-delta MLP whose last layer starts at zero (predicts the reference box)."""

    def __init__(self, *, d_model: int, num_layers: int = 3) -> None:
        super().__init__(in_dim=d_model, hidden_dim=d_model, out_dim=4, num_layers=num_layers)
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per token: ``x * Bernoulli(1 - p) / (1 - p)`` with one draw per row.

    Args:
        x: ``[B, N, D]`` (one draw per (image, query) token; docs/design.md Q14).
        p: drop probability in ``[0, 1]`` (``ValueError`` outside).
        training: identity when False.

    Returns:
        ``[B, N, D]``.
    """
    # torchvision's "row" mode draws once per index of dim 0, so one row per token: [B*N, D]
    return stochastic_depth(x.reshape(-1, x.shape[-1]), p, "row", training).reshape(x.shape)


@dataclass
class TokenTags:
    """Per-token tags of the decoder sequence, attached to ``RoutingInfo``.

    Attributes:
        kind: ``int64`` ``[B, N]`` ``TokenKind`` values.
        query: ``int64`` ``[B, N]`` index among the matching queries, -1 for other kinds.
    """

    kind: Tensor
    query: Tensor


class FFN(nn.Module):
    """Dense post-norm FFN sub-block: ``LN(x + Dropout(W2 Dropout(act(W1 x))))``.

    Args:
        d_model: width.
        hidden_dim: hidden width (DINO: 2048).
        dropout: dropout (DINO: 0).
        activation: ``relu`` (DINO) or ``gelu``.
    """

    def __init__(
        self, *, d_model: int, hidden_dim: int, dropout: float = 0.0, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, d_model)
        self.dropout = nn.Dropout(dropout)
        self.act = _activation(activation)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, tags: TokenTags | None = None) -> tuple[Tensor, None]:
        """``[B, N, D]`` -> (``[B, N, D]``, None); ``tags`` unused (``MoEBlock``'s interface)."""
        y = self.linear2(self.dropout(self.act(self.linear1(x))))
        return self.norm(x + self.dropout(y)), None


class MoEBlock(nn.Module):
    """Pre-norm MoE sub-block: ``x + DropPath(MoE(LN(x)))``, no norm after (docs/design.md §2.3).

    ``norm="post"`` gives the dense FFN's layout instead, ``LN(x + DropPath(MoE(x)))``, so an
    MoE block can replace a dense ``FFN`` exactly (upcycling, README "Making the mixture pay").

    Tokens are flattened batch-major (``t = b * N + n``) and the image index of every token is
    passed explicitly (docs/design.md Q2), so capacity per image and the DAMEX targets never depend
    on a guessed layout.

    Args:
        moe: the MoE layer, ``forward(x [T, D], token_image [T]) -> (y [T, D], RoutingInfo)``
            where ``y`` is only the experts' combined output (zero for dropped tokens).
        d_model: width.
        drop_path: DropPath probability per (image, query) token (DAMEX: 0.2).
        norm: ``"pre"`` (DAMEX) or ``"post"`` (the dense FFN's post-norm).
    """

    def __init__(
        self, *, moe: nn.Module, d_model: int, drop_path: float = 0.0, norm: str = "pre"
    ) -> None:
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"MoEBlock norm must be 'pre' or 'post', got {norm!r}")
        self.norm = nn.LayerNorm(d_model)
        self.moe = moe
        self.drop_path = drop_path
        self.norm_position = norm

    def forward(self, x: Tensor, tags: TokenTags | None = None) -> tuple[Tensor, RoutingInfo]:
        """Args: ``x`` ``[B, N, D]``, tags per token. Returns (``[B, N, D]``, RoutingInfo)."""
        bsz, num, dim = x.shape
        if tags is None:  # plain queries: all matching
            query = torch.arange(num, device=x.device).expand(bsz, num)
            tags = TokenTags(torch.full_like(query, int(TokenKind.MATCHING)), query)
        pre = self.norm_position == "pre"
        flat = (self.norm(x) if pre else x).reshape(bsz * num, dim)  # [B*N, D], batch-major
        token_image = torch.arange(bsz, device=x.device).repeat_interleave(num)  # [B*N]
        # the router's image context averages matching queries only (no DN / padding tokens,
        # which exist in training only and whose label embeddings name the dataset)
        context = (tags.kind == int(TokenKind.MATCHING)).reshape(-1)
        y, info = self.moe(flat, token_image, context_mask=context)
        info = info.with_tokens(tags.kind.reshape(-1), tags.query.reshape(-1))
        y = y.view(bsz, num, dim).to(x.dtype)
        out = x + drop_path(y, self.drop_path, self.training)
        return (out if pre else self.norm(out)), info


class EncoderLayer(nn.Module):
    """Deformable encoder layer (post-norm).

    Args:
        d_model: width.
        n_heads: attention heads.
        n_levels: feature levels.
        n_points: sampling points per head and level.
        dim_feedforward: FFN hidden width.
        dropout: dropout.
        activation: FFN activation.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_levels: int,
        n_points: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(
            d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FFN(
            d_model=d_model, hidden_dim=dim_feedforward, dropout=dropout, activation=activation
        )

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None,
    ) -> Tensor:
        """``src``/``pos`` ``[B, S, D]``, ``reference_points`` ``[B, S, L, 2]`` -> ``[B, S, D]``."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, None, padding_mask)
        src = self.norm(src + self.dropout(attn))
        return self.ffn(src)[0]


class DeformableEncoder(nn.Module):
    """A stack of ``EncoderLayer`` (may be empty).

    Args:
        layers: the encoder layers.
        grad_checkpoint: in training, keep only each layer's input and recompute the layer in
            the backward (``torch.utils.checkpoint``): activation memory for one extra forward.
    """

    def __init__(self, *, layers: Sequence[EncoderLayer], grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.grad_checkpoint = grad_checkpoint

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None,
    ) -> Tensor:
        """``[B, S, D]`` -> ``[B, S, D]``."""
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                src = checkpoint(
                    layer, src, pos, reference_points, spatial_shapes, padding_mask,
                    use_reentrant=False,
                )  # fmt: skip
            else:
                src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class DecoderLayer(nn.Module):
    """DINO decoder layer: self-attention -> deformable cross-attention -> injected FFN block.

    Args:
        self_attn: ``nn.MultiheadAttention(batch_first=True)``.
        cross_attn: ``MSDeformAttn``.
        ffn: ``FFN`` or ``MoEBlock`` (``forward(x, tags) -> (x, RoutingInfo | None)``).
        d_model: width.
        dropout: dropout after the attentions.
    """

    def __init__(
        self,
        *,
        self_attn: nn.MultiheadAttention,
        cross_attn: MSDeformAttn,
        ffn: nn.Module,
        d_model: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not self_attn.batch_first:
            raise ValueError("DecoderLayer.self_attn must be built with batch_first=True")
        self.self_attn = self_attn
        self.cross_attn = cross_attn
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)
        self.norm_sa = nn.LayerNorm(d_model)
        self.norm_ca = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None,
        tags: TokenTags | None,
    ) -> tuple[Tensor, RoutingInfo | None]:
        """One decoder layer.

        Args:
            tgt: ``[B, N, D]`` query content.
            query_pos: ``[B, N, D]``.
            reference_points: ``[B, N, L, 4]`` boxes scaled by the valid ratios.
            memory: ``[B, S, D]`` encoder output.
            spatial_shapes: per-level ``(H, W)``.
            memory_padding_mask: ``bool`` ``[B, S]`` True on padding.
            self_attn_mask: ``bool`` ``[N, N]`` True = blocked, or None.
            tags: token tags for the MoE block.

        Returns:
            (``[B, N, D]``, RoutingInfo or None).
        """
        q = k = tgt + query_pos
        sa = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm_sa(tgt + self.dropout(sa))
        ca = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, None, memory_padding_mask
        )
        tgt = self.norm_ca(tgt + self.dropout(ca))
        return self.ffn(tgt, tags)


@dataclass
class DecoderOutput:
    """Per decoder layer predictions of every query of the sequence.

    Attributes:
        logits: per layer ``[B, N, K]``.
        boxes: per layer ``[B, N, 4]`` ``cxcywh`` after sigmoid.
        routing: one ``RoutingInfo`` per MoE layer, in layer order.
    """

    logits: list[Tensor]
    boxes: list[Tensor]
    routing: list[RoutingInfo]


class DeformableDecoder(nn.Module):
    """Decoder layers + shared heads + iterative box refinement (look forward twice).

    Args:
        layers: the decoder layers.
        d_model: width.
        class_head: class head shared by all layers (``[.., D] -> [.., K]``).
        box_head: box-delta head shared by all layers (``[.., D] -> [.., 4]``).
    """

    def __init__(
        self,
        *,
        layers: Sequence[DecoderLayer],
        d_model: int,
        class_head: nn.Module,
        box_head: nn.Module,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.d_model = d_model
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(
            in_dim=2 * d_model, hidden_dim=d_model, out_dim=d_model, num_layers=2
        )
        self.class_head = class_head
        self.box_head = box_head

    def forward(
        self,
        tgt: Tensor,
        anchors: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        valid_ratios: Tensor,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None,
        tags: TokenTags | None,
    ) -> DecoderOutput:
        """Run all layers.

        Args:
            tgt: ``[B, N, D]`` initial content queries.
            anchors: ``[B, N, 4]`` initial boxes, inverse-sigmoid, no gradient expected.
            memory: ``[B, S, D]``.
            spatial_shapes: per-level ``(H, W)``.
            valid_ratios: ``[B, L, 2]`` valid fraction ``(x, y)`` of each level.
            memory_padding_mask: ``bool`` ``[B, S]``.
            self_attn_mask: ``bool`` ``[N, N]`` or None.
            tags: token tags (MoE).

        Returns:
            ``DecoderOutput``.
        """
        ref = anchors.sigmoid()  # [B, N, 4] detached reference used for sampling
        ref_pred = ref  # reference of this layer's prediction (keeps the previous layer's grad)
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        logits: list[Tensor] = []
        boxes: list[Tensor] = []
        routing: list[RoutingInfo] = []
        for idx, layer in enumerate(self.layers):
            ref_input = ref[:, :, None] * scale  # [B, N, L, 4]
            query_pos = self.ref_point_head(sine_box_embedding(ref, self.d_model // 2))
            tgt, info = layer(
                tgt,
                query_pos.to(tgt.dtype),
                ref_input,
                memory,
                spatial_shapes,
                memory_padding_mask,
                self_attn_mask,
                tags,
            )
            if info is not None:
                routing.append(info)
            hs = self.norm(tgt)
            logits.append(self.class_head(hs))
            boxes.append((self.box_head(hs) + inverse_sigmoid(ref_pred)).sigmoid())
            if idx < len(self.layers) - 1:
                new_ref = (self.box_head(tgt) + inverse_sigmoid(ref)).sigmoid()
                ref_pred = new_ref
                ref = new_ref.detach()
        return DecoderOutput(logits=logits, boxes=boxes, routing=routing)


def valid_ratios_from_masks(masks: Sequence[Tensor]) -> Tensor:
    """Valid fraction of every level (top-left-aligned padding; Deformable DETR).

    Args:
        masks: per level ``bool`` ``[B, H_l, W_l]`` True on padding.

    Returns:
        ``[B, L, 2]`` ``(valid_w / W_l, valid_h / H_l)``.
    """
    ratios = []
    for m in masks:
        valid_w = (~m[:, 0, :]).sum(1).float() / m.shape[2]  # [B]
        valid_h = (~m[:, :, 0]).sum(1).float() / m.shape[1]
        ratios.append(torch.stack((valid_w, valid_h), -1))
    return torch.stack(ratios, 1)


def encoder_reference_points(
    spatial_shapes: Sequence[tuple[int, int]], valid_ratios: Tensor
) -> Tensor:
    """Pixel-centre reference points of every location, for every level (Deformable DETR).

    Args:
        spatial_shapes: per-level ``(H, W)``.
        valid_ratios: ``[B, L, 2]``.

    Returns:
        ``[B, S, L, 2]`` normalized ``(x, y)`` in each level's padded frame.
    """
    device = valid_ratios.device
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        ry = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # [B, H*W]
        rx = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((rx, ry), -1))
    ref = torch.cat(refs, 1)  # [B, S, 2] in the valid frame
    return ref[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]


def encoder_proposals(
    memory_padding_mask: Tensor, spatial_shapes: Sequence[tuple[int, int]]
) -> tuple[Tensor, Tensor]:
    """DINO's fixed proposals: one box per location, centred on it, size ``0.05 * 2^level``.

    Args:
        memory_padding_mask: ``bool`` ``[B, S]`` True on padding.
        spatial_shapes: per-level ``(H, W)``.

    Returns:
        (``[B, S, 4]`` proposals as inverse-sigmoid ``cxcywh`` in the valid frame,
        ``bool`` ``[B, S]`` valid: not padding and every coordinate in (0.01, 0.99)).
    """
    bsz = memory_padding_mask.shape[0]
    device = memory_padding_mask.device
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask_l = memory_padding_mask[:, start : start + h * w].view(bsz, h, w)
        valid_h = (~mask_l[:, :, 0]).sum(1).clamp(min=1).float()  # [B]
        valid_w = (~mask_l[:, 0, :]).sum(1).clamp(min=1).float()
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        cx = (xs[None] + 0.5) / valid_w[:, None, None]  # [B, H, W]
        cy = (ys[None] + 0.5) / valid_h[:, None, None]
        wh = torch.full_like(cx, 0.05 * (2.0**lvl))
        proposals.append(torch.stack((cx, cy, wh, wh), -1).view(bsz, h * w, 4))
        start += h * w
    props = torch.cat(proposals, 1)  # [B, S, 4]
    valid = ((props > 0.01) & (props < 0.99)).all(-1) & ~memory_padding_mask
    # padded locations have cx, cy > 1 (a NaN logit): give them a finite anchor, since top-k
    # still picks them when an image has fewer valid locations than queries (DINO uses inf)
    props = props.masked_fill(~valid[..., None], 0.5)
    return torch.log(props / (1 - props)), valid


@dataclass
class TransformerOutput:
    """What the transformer hands to the detector.

    Attributes:
        decoder: per-layer predictions of the whole sequence ``[DN | matching | one-to-many]``.
        num_dn: DN queries at the front of the sequence.
        num_queries: matching queries Q.
        num_one_to_many: one-to-many queries at the end.
        interm: two-stage proposals' predictions for the top-Q, or None.
        memory: ``[B, S, D]`` encoder output.
        memory_padding_mask: ``bool`` ``[B, S]``.
        spatial_shapes: per-level ``(H, W)``.
    """

    decoder: DecoderOutput
    num_dn: int
    num_queries: int
    num_one_to_many: int
    interm: Prediction | None
    memory: Tensor
    memory_padding_mask: Tensor
    spatial_shapes: list[tuple[int, int]]


@dataclass
class _DecoderQueries:
    """The decoder's input sequence ``[DN | matching | one-to-many]`` of N tokens.

    Attributes:
        content: ``[B, N, D]`` content queries.
        anchors: ``[B, N, 4]`` unsigmoided ``cxcywh`` anchors.
        attn_mask: ``bool`` ``[N, N]`` self-attention mask (True = blocked), or None.
        tags: per-token kind and matching-query index.
        num_dn: DN tokens at the front.
    """

    content: Tensor
    anchors: Tensor
    attn_mask: Tensor | None
    tags: TokenTags
    num_dn: int


class DeformableTransformer(nn.Module):
    """Encoder + query selection + decoder.

    Args:
        encoder: the encoder (may have 0 layers).
        decoder: the decoder (owns the shared class/box heads).
        d_model: width.
        num_levels: feature levels L.
        num_queries: matching queries Q.
        num_classes: K (two-stage class head).
        two_stage: select anchors from encoder proposals (DINO "standard"); otherwise learned
            anchors.
        one_to_many_queries: Q2 extra training-only queries (H-DETR hybrid branch), 0 = off.
        pe_temperature: temperature of the sine position embedding (DINO: 20).
    """

    def __init__(
        self,
        *,
        encoder: DeformableEncoder,
        decoder: DeformableDecoder,
        d_model: int,
        num_levels: int,
        num_queries: int,
        num_classes: int,
        two_stage: bool = True,
        one_to_many_queries: int = 0,
        pe_temperature: float = 20.0,
    ) -> None:
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model must be even, got {d_model}")
        self.encoder = encoder
        self.decoder = decoder
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.two_stage = two_stage
        self.one_to_many_queries = one_to_many_queries
        self.pe_temperature = pe_temperature
        # level embeddings only feed the encoder's queries: none without encoder layers
        self.level_embed = (
            nn.Parameter(torch.empty(num_levels, d_model)) if len(encoder.layers) else None
        )
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.o2m_tgt_embed = (
            nn.Embedding(one_to_many_queries, d_model) if one_to_many_queries > 0 else None
        )
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.enc_class_head = ClassHead(d_model=d_model, num_classes=num_classes)
            self.enc_box_head = BoxHead(d_model=d_model)
            self.refpoint_embed = None
        else:
            self.refpoint_embed = nn.Embedding(num_queries + one_to_many_queries, 4)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # DINO: xavier on every matrix of the transformer; MSDeformAttn and the heads keep their
        # own init; MoE blocks are left to the MoE layer (avoids the official init quirk Q9).
        def visit(module: nn.Module) -> None:
            if isinstance(module, (MSDeformAttn, MoEBlock, ClassHead, BoxHead, nn.Embedding)):
                return
            for p in module.parameters(recurse=False):
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            for child in module.children():
                visit(child)

        visit(self)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        nn.init.normal_(self.tgt_embed.weight)
        if self.o2m_tgt_embed is not None:
            nn.init.normal_(self.o2m_tgt_embed.weight)
        if self.refpoint_embed is not None:
            # anchors spread uniformly over the image, small boxes (inverse-sigmoid space)
            with torch.no_grad():
                xy = torch.rand(self.refpoint_embed.weight.shape[0], 2) * 0.9 + 0.05
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(xy)
                self.refpoint_embed.weight[:, 2:] = inverse_sigmoid(torch.full_like(xy, 0.1))

    def forward(
        self,
        srcs: Sequence[Tensor],
        masks: Sequence[Tensor],
        dn: DenoisingQueries | None = None,
        one_to_many: bool = False,
    ) -> TransformerOutput:
        """Encode the levels, select queries, decode.

        Args:
            srcs: per level ``[B, D, H_l, W_l]`` (zero on padding).
            masks: per level ``bool`` ``[B, H_l, W_l]`` True on padding.
            dn: denoising queries to prepend, or None.
            one_to_many: append the Q2 one-to-many queries (training only).

        Returns:
            ``TransformerOutput``.
        """
        if len(srcs) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(srcs)}")
        bsz = srcs[0].shape[0]
        shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, D]
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)  # [B, S]
        valid_ratios = valid_ratios_from_masks(masks)  # [B, L, 2] (x, y)
        memory = self._encode(src_flat, mask_flat, masks, shapes, valid_ratios)  # [B, S, D]

        num_o2m = self.one_to_many_queries if one_to_many else 0
        anchors, interm = self._select_anchors(
            memory, mask_flat, shapes, self.num_queries + num_o2m
        )  # [B, Q + Q2, 4]
        q = self._decoder_queries(bsz, anchors, num_o2m, dn, srcs[0].device)
        decoded = self.decoder(
            q.content, q.anchors, memory, shapes, valid_ratios, mask_flat, q.attn_mask, q.tags
        )
        return TransformerOutput(
            decoder=decoded,
            num_dn=q.num_dn,
            num_queries=self.num_queries,
            num_one_to_many=num_o2m,
            interm=interm,
            memory=memory,
            memory_padding_mask=mask_flat,
            spatial_shapes=shapes,
        )

    def _encode(
        self,
        src_flat: Tensor,
        mask_flat: Tensor,
        masks: Sequence[Tensor],
        shapes: list[tuple[int, int]],
        valid_ratios: Tensor,
    ) -> Tensor:
        """The encoder's output ``[B, S, D]`` (``src_flat`` itself without encoder layers)."""
        if not len(self.encoder.layers):
            return src_flat
        pos_flat = torch.cat(
            [
                sine_position_embedding(m, self.d_model // 2, self.pe_temperature)
                .flatten(2)
                .transpose(1, 2)
                + self.level_embed[lvl]
                for lvl, m in enumerate(masks)
            ],
            1,
        ).to(src_flat.dtype)  # [B, S, D]
        ref_points = encoder_reference_points(shapes, valid_ratios)
        return self.encoder(src_flat, pos_flat, ref_points, shapes, mask_flat)

    def _select_anchors(
        self, memory: Tensor, mask_flat: Tensor, shapes: list[tuple[int, int]], num_select: int
    ) -> tuple[Tensor, Prediction | None]:
        """The decoder's initial anchors and, two-stage, the top-Q proposals' predictions.

        Returns:
            ``(anchors, interm)``: anchors ``[B, num_select, 4]`` (unsigmoided ``cxcywh``,
            detached); ``interm`` is None with learned anchors.
        """
        if not self.two_stage:
            bsz = memory.shape[0]
            return self.refpoint_embed.weight[:num_select][None].expand(bsz, -1, -1), None
        proposals, valid = encoder_proposals(mask_flat, shapes)
        out_mem = memory.masked_fill(~valid[..., None], 0.0)
        out_mem = self.enc_output_norm(self.enc_output(out_mem))  # [B, S, D]
        enc_logits = self.enc_class_head(out_mem)  # [B, S, K]
        enc_boxes_unsig = self.enc_box_head(out_mem) + proposals  # [B, S, 4]
        if num_select > enc_logits.shape[1]:
            raise ValueError(
                f"two-stage selection of {num_select} queries needs at least as many encoder "
                f"locations, got {enc_logits.shape[1]} (image too small for num_queries)"
            )
        scores = enc_logits.detach().float().amax(-1).masked_fill(~valid, float("-inf"))
        topk = scores.topk(num_select, dim=1).indices  # [B, Q + Q2]
        sel_boxes = torch.gather(enc_boxes_unsig, 1, topk[..., None].expand(-1, -1, 4))
        q_idx = topk[:, : self.num_queries, None]
        interm = Prediction(
            logits=torch.gather(enc_logits, 1, q_idx.expand(-1, -1, enc_logits.shape[-1])),
            boxes=sel_boxes[:, : self.num_queries].sigmoid(),
        )
        return sel_boxes.detach(), interm  # [B, Q + Q2, 4]

    def _decoder_queries(
        self,
        bsz: int,
        anchors: Tensor,
        num_o2m: int,
        dn: DenoisingQueries | None,
        device: torch.device,
    ) -> _DecoderQueries:
        """The decoder sequence ``[DN | matching | one-to-many]``: content, anchors, tags, mask."""
        content = self.tgt_embed.weight[None].expand(bsz, -1, -1)  # [B, Q, D]
        if num_o2m:
            content = torch.cat([content, self.o2m_tgt_embed.weight[None].expand(bsz, -1, -1)], 1)

        kinds = [torch.full((bsz, self.num_queries), int(TokenKind.MATCHING), device=device)]
        queries = [torch.arange(self.num_queries, device=device).expand(bsz, -1)]
        if num_o2m:
            kinds.append(torch.full((bsz, num_o2m), int(TokenKind.ONE_TO_MANY), device=device))
            queries.append(torch.full((bsz, num_o2m), -1, device=device))
        num_dn = 0
        attn_mask = None
        if dn is not None:
            num_dn = dn.num_queries
            content = torch.cat([dn.content.to(content.dtype), content], 1)
            anchors = torch.cat([dn.anchors.to(anchors.dtype), anchors], 1)
            attn_mask = dn.attn_mask
            expected = num_dn + self.num_queries + num_o2m
            if tuple(attn_mask.shape) != (expected, expected):
                raise ValueError(
                    f"dn.attn_mask must be [{expected}, {expected}] (DN + Q + Q2), got "
                    f"{tuple(attn_mask.shape)}"
                )
            kinds.insert(0, dn.token_kind)
            queries.insert(0, torch.full_like(dn.token_kind, -1))
        elif num_o2m:
            attn_mask = build_self_attn_mask(
                num_groups=0,
                pad_size=0,
                num_queries=self.num_queries,
                num_one_to_many=num_o2m,
                device=device,
            )
        tags = TokenTags(kind=torch.cat(kinds, 1).long(), query=torch.cat(queries, 1).long())
        return _DecoderQueries(
            content=content, anchors=anchors, attn_mask=attn_mask, tags=tags, num_dn=num_dn
        )
