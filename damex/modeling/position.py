"""Sine position embeddings and small box-coordinate helpers.

Two embeddings are used by DINO (Zhang et al. 2022, following DETR / Deformable DETR / DAB-DETR):

- ``sine_position_embedding``: the per-pixel embedding of the feature maps (encoder), computed
  from the padding mask and normalized by each image's *valid* size, so it does not depend on how
  much padding the batch adds. DINO uses temperature 20 for both axes (docs/design.md §2.1).
- ``sine_box_embedding``: the embedding of a query's reference box ``(cx, cy, w, h)`` (DAB-DETR's
  ``gen_sineembed_for_position``), fed to the decoder's ``ref_point_head`` MLP.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sine_position_embedding", "sine_box_embedding", "inverse_sigmoid"]


def _interleave_sin_cos(x: Tensor) -> Tensor:
    """``[..., F]`` -> ``[..., F]`` with sin on even and cos on odd features (DETR's layout)."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_embedding(
    mask: Tensor,
    num_pos_feats: int,
    temperature: float = 20.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
) -> Tensor:
    """Sine embedding of every pixel of a padded map (DETR; DINO ``PositionEmbeddingSineHW``).

    Args:
        mask: ``bool`` ``[B, H, W]``, True on padding (valid region at the top-left).
        num_pos_feats: features per axis; the output has ``2 * num_pos_feats`` channels
            (y first, then x).
        temperature: frequency base (DINO: 20 for both axes).
        normalize: divide the cumulative coordinate by the valid extent (then times ``scale``).
        scale: range of the normalized coordinate.

    Returns:
        ``float32`` ``[B, 2 * num_pos_feats, H, W]``.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be [B, H, W], got {tuple(mask.shape)}")
    if num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
    not_mask = (~mask).float()
    y_embed = not_mask.cumsum(1)  # [B, H, W]
    x_embed = not_mask.cumsum(2)
    if normalize:
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)  # [B, H, W, F]
    pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)  # [B, 2F, H, W]


def sine_box_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalized reference boxes (DAB-DETR; ``gen_sineembed_for_position``).

    Args:
        boxes: ``[..., 4]`` ``(cx, cy, w, h)`` in [0, 1] (or ``[..., 2]`` points).
        num_feats: features per coordinate (DINO: ``d_model / 2``).
        temperature: frequency base.

    Returns:
        ``[..., C * num_feats]`` with C = 4 (or 2), coordinate order ``(y, x, w, h)`` as in DINO.
    """
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"boxes must be [..., 2] or [..., 4], got {tuple(boxes.shape)}")
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    coords = boxes.float() * (2 * math.pi)
    embeds = [_interleave_sin_cos(coords[..., i, None] / dim_t) for i in range(boxes.shape[-1])]
    embeds[0], embeds[1] = embeds[1], embeds[0]  # (x, y, ...) -> (y, x, ...)
    return torch.cat(embeds, dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both terms to ``>= eps`` (DINO)."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
