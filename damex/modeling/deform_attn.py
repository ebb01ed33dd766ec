"""Multi-scale deformable attention in pure PyTorch (Deformable DETR, Zhu et al. 2021, eq. 3).

``ms_deform_attn`` is the core: bilinear sampling of every level with ``F.grid_sample``
(``align_corners=False``, zero padding) and the attention-weighted sum. A fused kernel may replace
it later behind the same signature. ``MSDeformAttn`` is the module with the standard
parameterization (sampling offsets, attention weights, value and output projections).

Coordinates: sampling locations are normalized to ``[0, 1]`` of each level's *padded* feature map
(``(0, 0)`` is the top-left corner of the top-left pixel, ``(1, 1)`` the bottom-right corner of the
bottom-right pixel). Callers pass reference points already scaled by the valid ratios, so
sampling in pixel units does not depend on how much padding the batch adds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ms_deform_attn", "MSDeformAttn", "spatial_shapes_list"]


def spatial_shapes_list(spatial_shapes: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``[L, 2]`` tensor or sequence of ``(H, W)`` -> list of int tuples (one host sync at most)."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    level_start_index: Tensor | Sequence[int],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention core.

    ``out[b, q, h] = sum_{l, p} A[b, q, h, l, p] * bilinear(value_l[b, :, h], loc[b, q, h, l, p])``,
    with zeros outside the map (Deformable DETR eq. 3).

    Args:
        value: ``[B, S, H, Dh]`` values of all levels, flattened row-major per level.
        spatial_shapes: ``[L, 2]`` ``(H_l, W_l)`` per level (tensor or sequence).
        level_start_index: ``[L]`` offset of each level in ``S`` (consistency-checked only).
        sampling_locations: ``[B, Nq, H, L, P, 2]`` normalized ``(x, y)`` in [0, 1].
        attention_weights: ``[B, Nq, H, L, P]`` (already softmaxed over ``L * P``).

    Returns:
        ``[B, Nq, H * Dh]`` in ``value``'s dtype.
    """
    shapes = spatial_shapes_list(spatial_shapes)
    bsz, num_value, num_heads, head_dim = value.shape
    _, num_query, _, num_levels, num_points, _ = sampling_locations.shape
    if len(shapes) != num_levels or sum(h * w for h, w in shapes) != num_value:
        raise ValueError(
            f"spatial_shapes {shapes} do not match value [B, S={num_value}, ...] and "
            f"sampling_locations with L={num_levels}"
        )
    starts = torch.as_tensor(level_start_index).tolist() if level_start_index is not None else None
    expected_starts = [0]
    for h, w in shapes[:-1]:
        expected_starts.append(expected_starts[-1] + h * w)
    if starts is not None and [int(s) for s in starts] != expected_starts:
        raise ValueError(f"level_start_index must be {expected_starts}, got {starts}")

    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    weights = attention_weights.transpose(1, 2).reshape(
        bsz * num_heads, 1, num_query, num_levels, num_points
    )
    out = None
    for lvl, (h, w) in enumerate(shapes):
        value_l = value_levels[lvl].permute(0, 2, 3, 1).reshape(bsz * num_heads, head_dim, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).reshape(bsz * num_heads, num_query, -1, 2)
        sampled = F.grid_sample(
            value_l,
            grid_l.to(value_l.dtype),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # [B*H, Dh, Nq, P]
        # accumulate level by level: no [B*H, Dh, Nq, L*P] intermediate
        term = (sampled * weights[..., lvl, :].to(sampled.dtype)).sum(-1)  # [B*H, Dh, Nq]
        out = term if out is None else out + term
    return out.view(bsz, num_heads * head_dim, num_query).transpose(1, 2)  # [B, Nq, H*Dh]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR parameterization).

    Args:
        d_model: model width.
        n_levels: number of feature levels L.
        n_heads: attention heads H (``d_model % n_heads == 0``).
        n_points: sampling points P per head and level.
    """

    def __init__(self, *, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR init: offsets start on a per-head directional grid, uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [H, 2]
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Tensor | Sequence[int] | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from queries to the multi-scale values.

        Args:
            query: ``[B, Nq, D]`` (content + position).
            reference_points: ``[B, Nq, L, 2]`` normalized points, or ``[B, Nq, L, 4]`` boxes
                ``(cx, cy, w, h)``; offsets are then scaled by ``w, h * 0.5 / n_points``.
            value_input: ``[B, S, D]`` flattened multi-scale features.
            spatial_shapes: ``(H_l, W_l)`` per level.
            level_start_index: ``[L]`` (optional, checked).
            padding_mask: ``bool`` ``[B, S]``, True at padded locations (their value is zeroed).

        Returns:
            ``[B, Nq, D]``.
        """
        bsz, num_query, _ = query.shape
        shapes = spatial_shapes_list(spatial_shapes)
        value = self.value_proj(value_input)  # [B, S, D]
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(bsz, -1, self.n_heads, self.d_model // self.n_heads)  # [B, S, H, Dh]
        offsets = self.sampling_offsets(query).view(
            bsz, num_query, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            bsz, num_query, self.n_heads, self.n_levels * self.n_points
        )
        weights = (
            weights.float()
            .softmax(-1)
            .view(bsz, num_query, self.n_heads, self.n_levels, self.n_points)
        )
        offsets = offsets.float()
        ref = reference_points.float()
        if ref.shape[-1] == 2:
            normalizer = torch.tensor(
                [(w, h) for h, w in shapes], dtype=torch.float32, device=query.device
            )  # [L, 2] (x, y)
            normalizer = normalizer[None, None, None, :, None]  # [1, 1, 1, L, 1, 2]
            locations = ref[:, :, None, :, None, :] + offsets / normalizer
        elif ref.shape[-1] == 4:
            locations = (
                ref[:, :, None, :, None, :2]
                + offsets / self.n_points * ref[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must be [B, Nq, L, 2|4], got {tuple(reference_points.shape)}"
            )
        # fp32 core: sampling locations need more precision than bf16 gives (~0.4% of a map).
        out = ms_deform_attn(value.float(), shapes, level_start_index, locations, weights)
        return self.output_proj(out.to(query.dtype))
