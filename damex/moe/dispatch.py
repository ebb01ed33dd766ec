"""Capacity, batch-prioritized slot assignment, dispatch and combine (sort based).

Vocabulary: ``T`` tokens, each with ``k`` routing *assignments* (token, choice ``j``, expert
``e``, gate ``g``). Tokens belong to capacity *groups* (one image, or the whole batch).

Capacity (docs/design.md §2.3, docs/design.md §2.3/§7): for a group of ``T_g`` tokens,
``C_g = max(1, floor(|cf| * k * T_g / E))`` slots per expert; ``cf == 0`` means no limit.
tutel's negative factor ("dynamic capacity capped at |cf|", microsoft/Tutel#135) sizes its
buffers by the actual maximum load but drops exactly the tokens that ``cf = |cf|`` drops; since
nothing here is padded, ``cf < 0`` and ``cf = |cf|`` give identical results. The ``max(1, .)``
keeps a tiny group (``T_g < E / (|cf| k)``) from losing every token; tutel's formula
``k * floor(cf * ceil(T/E))`` has the same floor of one slot for ``cf >= 1`` and can be one
slot larger (``T = 900, E = 8, cf = 1.25``: tutel 141, here 140, the docs/design.md §2.3 formula).

Slot order (batch-prioritized routing, BPR, as tutel ``use_bpr``): inside one (group, expert)
bucket, all first choices come before all second choices (tutel offsets the locations of the
j-th choice by the counts of the earlier ones), and within one choice rank assignments with a
higher gate come first; ties keep token order. Assignments whose slot is ``>= C_g`` are
dropped: they contribute zero to the output.

The plan sorts the kept assignments by expert (then group, choice, gate), so each expert's
tokens are one contiguous run: dispatch is one ``index_select`` (``[N, d]``), combine is one
``index_add_`` (``[T, d]``). No ``[T, E, C]`` one-hot tensor and no padding exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from damex.config import CapacityGroup, choices

__all__ = [
    "DispatchPlan",
    "capacity_per_group",
    "combine",
    "dispatch",
    "group_index",
    "plan_dispatch",
]


@dataclass
class DispatchPlan:
    """Where every kept assignment goes.

    Attributes:
        token: ``int64 [N]`` token of each kept assignment, sorted by expert.
        choice: ``int64 [N]`` which of the ``k`` choices it is.
        expert: ``int64 [N]`` its expert (non-decreasing).
        counts: ``E`` Python ints, kept assignments per expert (a run of ``x[token]`` each).
        kept: ``bool [T, k]`` False where the capacity dropped the assignment.
        slot: ``int64 [T, k]`` the assignment's position in its (group, expert) bucket.
        capacity: ``int64 [G]`` slots per expert in each group, or None (no limit).
    """

    token: Tensor
    choice: Tensor
    expert: Tensor
    counts: list[int]
    kept: Tensor
    slot: Tensor
    capacity: Tensor | None

    @property
    def num_kept(self) -> int:
        return int(self.token.shape[0])


def group_index(
    token_image: Tensor | None, num_tokens: int, capacity_group: str, device: torch.device
) -> tuple[Tensor, int]:
    """Capacity group of every token.

    Args:
        token_image: ``int64 [T]`` image of each token, or None (one group).
        num_tokens: ``T``.
        capacity_group: ``"image"`` (one group per distinct ``token_image`` value) or ``"batch"``.
        device: where to build the result.

    Returns:
        ``(group [T] in 0..G-1, G)``.
    """
    if capacity_group not in choices(CapacityGroup):
        raise ValueError(f"capacity_group must be 'image' or 'batch', got {capacity_group!r}")
    if capacity_group == "batch" or token_image is None:
        return torch.zeros(num_tokens, dtype=torch.long, device=device), 1
    _, inverse = torch.unique(token_image, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if num_tokens > 0 else 0
    return inverse.reshape(-1), num_groups


def capacity_per_group(
    group_sizes: Tensor, *, num_experts: int, top_k: int, capacity_factor: float
) -> Tensor | None:
    """Slots per expert for each group: ``max(1, floor(|cf| * k * T_g / E))``; None if cf == 0.

    Args:
        group_sizes: ``int64 [G]`` tokens per group.
        num_experts: ``E``.
        top_k: ``k``.
        capacity_factor: ``cf`` (0: no limit; negative: same drops as ``|cf|``).

    Returns:
        ``int64 [G]`` or None.
    """
    if capacity_factor == 0 or not math.isfinite(capacity_factor):
        return None
    cf = abs(float(capacity_factor))
    # Integer arithmetic where possible so that e.g. 1.25 * 8 * 100 / 8 is exactly 125.
    cap = torch.floor(group_sizes.double() * (cf * top_k) / num_experts + 1e-9).long()
    return cap.clamp_min(1)


def plan_dispatch(
    expert: Tensor,
    gate: Tensor,
    group: Tensor,
    num_groups: int,
    num_experts: int,
    capacity: Tensor | None,
) -> DispatchPlan:
    """Batch-prioritized slot assignment and the expert-sorted order of the kept assignments.

    Args:
        expert: ``int64 [T, k]`` chosen experts (column j = j-th choice).
        gate: ``[T, k]`` gate of each choice (priority inside a bucket; not differentiated).
        group: ``int64 [T]`` capacity group of each token, in ``0..num_groups-1``.
        num_groups: ``G``.
        num_experts: ``E``.
        capacity: ``int64 [G]`` slots per expert per group, or None (keep everything).

    Returns:
        The :class:`DispatchPlan`.
    """
    num_tokens, k = expert.shape
    device = expert.device
    flat_expert = expert.reshape(-1)  # [T*k], index a = t*k + j
    flat_gate = gate.detach().reshape(-1)
    flat_group = group.repeat_interleave(k)  # [T*k]
    flat_choice = torch.arange(k, device=device).repeat(num_tokens)  # [T*k]
    # Two stable sorts: by gate (descending), then by the bucket key (expert, group, choice).
    by_gate = torch.argsort(flat_gate, descending=True, stable=True)
    key = (flat_expert * num_groups + flat_group) * k + flat_choice
    order = by_gate[torch.argsort(key[by_gate], stable=True)]  # [T*k]
    bucket = (flat_expert * num_groups + flat_group)[order]  # non-decreasing
    bucket_sizes = torch.bincount(bucket, minlength=num_experts * num_groups)
    bucket_start = torch.cumsum(bucket_sizes, 0) - bucket_sizes
    slot_sorted = torch.arange(order.numel(), device=device) - bucket_start[bucket]
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    if capacity is None:
        kept_sorted = torch.ones_like(slot_sorted, dtype=torch.bool)
    else:
        kept_sorted = slot_sorted < capacity.to(device)[flat_group[order]]
    kept = torch.empty_like(kept_sorted)
    kept[order] = kept_sorted
    kept_idx = order[kept_sorted]  # [N] assignment index, sorted by expert
    kept_expert = flat_expert[kept_idx]
    counts = torch.bincount(kept_expert, minlength=num_experts).tolist()
    return DispatchPlan(
        token=torch.div(kept_idx, k, rounding_mode="floor"),
        choice=kept_idx % k,
        expert=kept_expert,
        counts=counts,
        kept=kept.reshape(num_tokens, k),
        slot=slot.reshape(num_tokens, k),
        capacity=capacity,
    )


def dispatch(x: Tensor, plan: DispatchPlan) -> Tensor:
    """Gather the tokens of the kept assignments in expert order: ``[T, d] -> [N, d]``."""
    return x.index_select(0, plan.token)


def combine(expert_out: Tensor, plan: DispatchPlan, gate: Tensor, num_tokens: int) -> Tensor:
    """``y_t = sum over kept choices j of gate[t, j] * expert_out[row of (t, j)]``.

    Args:
        expert_out: ``[N, d]`` expert outputs in plan order.
        plan: the plan that produced the rows.
        gate: ``[T, k]`` combine weights (differentiable).
        num_tokens: ``T``.

    Returns:
        ``[T, d]`` in ``expert_out``'s dtype; rows of fully dropped tokens are zero.
    """
    weight = gate[plan.token, plan.choice].to(expert_out.dtype)  # [N]
    y = expert_out.new_zeros(num_tokens, expert_out.shape[-1])  # [T, d]
    return y.index_add(0, plan.token, expert_out * weight.unsqueeze(-1))
