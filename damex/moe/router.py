"""Top-k routers: linear (tutel ``LinearTopKGate``) and cosine (tutel ``CosineTopKGate``).

Facts carried over (docs/design.md §2.3): the linear router has no bias; during training,
``N(0, 1) * gate_noise / E`` is added to the logits; the scores are the softmax of the (noisy)
logits; the top-k experts are taken from those scores; the gate of a choice is its softmax
probability (not renormalized for k = 1, optionally renormalized over the k choices for k > 1).
Routing runs in float32 with autocast disabled, like the official layer.

The cosine router follows X-MoE (Chi et al., 2022, "On the Representation Collapse of Sparse
Mixture of Experts") as shipped in tutel: logits = s * cos(P x, w_e) with a learned projection
``P`` and a learned temperature, ``s = exp(min(t, log 100))``, ``t`` initialized to ``log 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from damex.config import RouterKind, choices

__all__ = ["ROUTER_KINDS", "RouterOutput", "TopKRouter"]

ROUTER_KINDS = choices(RouterKind)


@dataclass
class RouterOutput:
    """One routing decision for ``T`` tokens.

    Attributes:
        logits: ``[T, E]`` clean logits (float32, or float64 for float64 inputs).
        noisy_logits: ``[T, E]`` logits with training noise, or None.
        scores: ``[T, E]`` softmax of the logits used for selection (noisy if any).
        expert: ``int64 [T, k]`` chosen experts, best first.
        gate: ``[T, k]`` combine weights, same dtype as the logits.
    """

    logits: Tensor
    noisy_logits: Tensor | None
    scores: Tensor
    expert: Tensor
    gate: Tensor


class TopKRouter(nn.Module):
    """Router: logits -> (train) noise -> softmax -> top-k -> gates.

    Args:
        d_model: token width ``d``.
        num_experts: ``E`` (the global number of experts).
        top_k: experts per token, ``1 <= k <= E``.
        gate_noise: training noise scale: ``N(0, 1) * gate_noise / E`` is added to the logits
            (0 disables it).
        kind: ``"linear"`` (``W x``, no bias) or ``"cosine"``.
        normalize_gate: renormalize the k gates of a token to sum to 1 (only matters for k > 1).
        cosine_dim: projection width of the cosine router.
        base_experts: ``B > 0`` when experts ``B..E-1`` were added to a trained layer
            (``damex extend``): every expert competes for the top-k choice, but the gate of a
            chosen old expert (id ``< B``) is its softmax probability among the ``B`` old
            experts only, so a token that picks an old expert gets exactly the old layer's
            output. 0 = off.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        gate_noise: float = 1.0,
        kind: str = "linear",
        normalize_gate: bool = False,
        cosine_dim: int = 256,
        base_experts: int = 0,
    ) -> None:
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"router kind must be one of {ROUTER_KINDS}, got {kind!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if gate_noise < 0:
            raise ValueError(f"gate_noise must be >= 0, got {gate_noise}")
        if not 0 <= base_experts < num_experts:
            raise ValueError(f"base_experts must be in [0, {num_experts}), got {base_experts}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate_noise = float(gate_noise)
        self.kind = kind
        self.normalize_gate = normalize_gate
        self.base_experts = int(base_experts)
        if kind == "linear":
            self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # [E, d]
            self.projection: nn.Linear | None = None
            self.register_parameter("temperature", None)
        else:
            self.projection = nn.Linear(d_model, cosine_dim, bias=False)
            self.weight = nn.Parameter(torch.empty(num_experts, cosine_dim))  # [E, p]
            self.temperature = nn.Parameter(torch.full((1,), math.log(2.0)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init for the gate (and projection); temperature ``log 2``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.projection is not None:
            self.projection.reset_parameters()
            with torch.no_grad():
                self.temperature.fill_(math.log(2.0))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"kind={self.kind}, gate_noise={self.gate_noise}, "
            f"normalize_gate={self.normalize_gate}"
            + (f", base_experts={self.base_experts}" if self.base_experts else "")
        )

    def compute_logits(self, x: Tensor) -> Tensor:
        """Clean logits ``[T, E]`` in float32 or wider (autocast disabled)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            if self.projection is None:
                return F.linear(x, self.weight.to(dtype))
            proj = F.normalize(F.linear(x, self.projection.weight.to(dtype)), dim=-1)  # [T, p]
            logits = proj @ F.normalize(self.weight.to(dtype), dim=-1).t()  # [T, E]
            scale = self.temperature.to(dtype).clamp(max=math.log(100.0)).exp()
            return logits * scale

    def forward(self, x: Tensor) -> RouterOutput:
        """Route ``x [T, d]``.

        Returns:
            :class:`RouterOutput`; noise is added only in training mode with ``gate_noise > 0``.
        """
        logits = self.compute_logits(x)  # [T, E]
        noisy = None
        if self.training and self.gate_noise > 0:
            noisy = logits + torch.randn_like(logits) * (self.gate_noise / self.num_experts)
        scores = torch.softmax(noisy if noisy is not None else logits, dim=-1)  # [T, E]
        gate, expert = torch.topk(scores, self.top_k, dim=-1)  # [T, k] each
        if self.base_experts > 0:  # old experts' gates ignore the experts added later
            used = noisy if noisy is not None else logits
            old = torch.softmax(used[:, : self.base_experts], dim=-1)  # [T, B]
            old_gate = old.gather(1, expert.clamp(max=self.base_experts - 1))
            gate = torch.where(expert < self.base_experts, old_gate, gate)
        if self.normalize_gate and self.top_k > 1:
            gate = gate / gate.sum(-1, keepdim=True).clamp_min(torch.finfo(gate.dtype).eps)
        return RouterOutput(
            logits=logits, noisy_logits=noisy, scores=scores, expert=expert, gate=gate
        )
