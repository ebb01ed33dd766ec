"""Routing information of every MoE layer (docs/design.md §9): plain tensors, no closures."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

__all__ = ["RoutingInfo"]


@dataclass
class RoutingInfo:
    """What one MoE layer decided for the ``T`` tokens of one forward pass.

    Attributes:
        logits: ``[T, E]`` clean router logits (no noise), with gradient.
        noisy_logits: ``[T, E]`` logits after training noise, or None when no noise was added.
        expert: ``int64`` ``[T, k]`` chosen experts, best first.
        gate: ``[T, k]`` combine weights (softmax probability of the chosen expert, optionally
            renormalized over the k choices).
        kept: ``bool`` ``[T, k]`` False where the token was dropped by the capacity limit.
        token_image: ``int64`` ``[T]`` which image of the batch the token belongs to.
        token_kind: ``int64`` ``[T]`` or None: a tag set by the caller (the detector uses it for
            matching / denoising / padding queries; see ``damex.modeling.outputs.TokenKind``).
        token_query: ``int64`` ``[T]`` or None: the caller's per-image index of the token (the
            detector: index among the matching queries, -1 for other kinds).
    """

    logits: Tensor
    noisy_logits: Tensor | None
    expert: Tensor
    gate: Tensor
    kept: Tensor
    token_image: Tensor
    token_kind: Tensor | None = None
    token_query: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.logits.shape[-1])

    def with_tokens(self, token_kind: Tensor, token_query: Tensor) -> RoutingInfo:
        """A copy with the caller's token tags attached."""
        return replace(self, token_kind=token_kind, token_query=token_query)
