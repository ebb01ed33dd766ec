"""Expert-choice routing (Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS
2022): every expert takes its top-``C`` tokens, instead of every token taking its top-k experts.

Load is balanced by construction (each expert processes exactly ``C`` tokens of a capacity group),
so no balance loss is needed; a token may be taken by any number of experts, 0 to ``E``. The
paper's gate is the token's softmax score for the expert, ``y_t = sum over experts e that took t
of S[t, e] * Expert_e(x_t)``; a token no expert took gets 0 (its residual passes).

Capacity per group of ``T_g`` tokens: ``C_g = min(T_g, max(1, floor(c * T_g / E)))`` with the
paper's capacity factor ``c`` = the average number of experts per token; here ``c = |cf| * k``
from the layer's ``capacity_factor`` and ``top_k`` (``cf = 0`` counts as 1), so the default
``k = 1, cf = 0`` gives every expert ``T_g / E`` tokens, one expert per token on average.

The result is expressed in the token-choice vocabulary of :mod:`damex.moe.dispatch`, so
dispatch, experts, combine and :class:`~damex.moe.types.RoutingInfo` are shared: each token
lists all ``E`` experts as its "choices", ordered by its own descending score (column 0 is the
router's preferred expert, which the routing statistics count), with ``kept`` True where that
expert took the token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from damex.moe.dispatch import DispatchPlan

__all__ = ["expert_choice_capacity", "plan_expert_choice"]


def expert_choice_capacity(
    group_sizes: Tensor, *, num_experts: int, top_k: int, capacity_factor: float
) -> Tensor:
    """``int64 [G]`` tokens each expert takes per group: ``min(T_g, max(1, floor(c T_g / E)))``.

    Args:
        group_sizes: ``int64 [G]`` tokens per group.
        num_experts: ``E``.
        top_k: ``k``; ``c = |capacity_factor| * k`` (``capacity_factor = 0`` counts as 1).
        capacity_factor: the layer's ``cf``.
    """
    c = (abs(float(capacity_factor)) or 1.0) * top_k
    cap = torch.floor(group_sizes.double() * c / num_experts + 1e-9).long().clamp_min(1)
    return torch.minimum(cap, group_sizes.long())


def plan_expert_choice(
    scores: Tensor, group: Tensor, num_groups: int, capacity: Tensor
) -> tuple[Tensor, Tensor, DispatchPlan]:
    """Every expert takes the ``capacity[g]`` highest-scoring tokens of every group ``g``.

    Args:
        scores: ``[T, E]`` router softmax scores (differentiable: they become the gates).
        group: ``int64 [T]`` capacity group of each token.
        num_groups: ``G``.
        capacity: ``int64 [G]`` tokens per expert per group (:func:`expert_choice_capacity`).

    Returns:
        ``(expert [T, E], gate [T, E], plan)``: each token's experts by descending score, their
        scores (the combine weights), and the dispatch plan whose ``kept [T, E]`` marks the
        experts that took the token (ties between tokens: lower token index first).
    """
    num_tokens, num_experts = scores.shape
    device = scores.device
    expert = torch.argsort(scores.detach(), dim=1, descending=True, stable=True)  # [T, E]
    gate = scores.gather(1, expert)  # [T, E]
    flat_expert = expert.reshape(-1)  # [T*E], assignment a = t*E + j
    flat_score = gate.detach().reshape(-1)
    flat_group = group.repeat_interleave(num_experts)  # [T*E]
    # per (expert, group) bucket, tokens by descending score: two stable sorts
    by_score = torch.argsort(flat_score, descending=True, stable=True)
    bucket_key = flat_expert * num_groups + flat_group
    order = by_score[torch.argsort(bucket_key[by_score], stable=True)]  # [T*E]
    bucket = bucket_key[order]
    bucket_sizes = torch.bincount(bucket, minlength=num_experts * num_groups)
    bucket_start = torch.cumsum(bucket_sizes, 0) - bucket_sizes
    rank_sorted = torch.arange(order.numel(), device=device) - bucket_start[bucket]
    kept_sorted = rank_sorted < capacity.to(device)[flat_group[order]]
    slot = torch.empty_like(rank_sorted)
    slot[order] = rank_sorted
    kept = torch.empty_like(kept_sorted)
    kept[order] = kept_sorted
    kept_idx = order[kept_sorted]  # [N], sorted by expert
    kept_expert = flat_expert[kept_idx]
    plan = DispatchPlan(
        token=torch.div(kept_idx, num_experts, rounding_mode="floor"),
        choice=kept_idx % num_experts,
        expert=kept_expert,
        counts=torch.bincount(kept_expert, minlength=num_experts).tolist(),
        kept=kept.reshape(num_tokens, num_experts),
        slot=slot.reshape(num_tokens, num_experts),
        capacity=capacity,
    )
    return expert, gate, plan
