"""``MoEFFN``: router + capacity/dispatch + experts + combine -> ``(y, RoutingInfo)``.

The layer returns only the combined expert output (plus the shared expert's, if any); the
caller (the decoder layer) owns the norm, DropPath and residual (official DAMEX:
``out = x + DropPath(MoE(LN(x)))``).

Recipe options (README, "Making the mixture pay"):

* ``shared_expert``: a dense FFN every token passes through, added to the routed experts'
  output (DeepSeekMoE's shared expert, Dai et al. 2024): ``y = Shared(x) + sum_j g_j E_j(x)``.
* ``unit_gate``: top-1 combine weight of value 1 with the gate's gradient (straight-through,
  ``g - sg(g) + 1``), so a routed token gets the full expert output at any router confidence
  (with a fresh router the softmax gate is ~1/E, which scales the FFN output down E-fold).
* ``expert_init="identical"``: every routed expert starts as a copy of expert 0 (the MoE starts
  as the dense FFN it replaces; with ``unit_gate`` and no token dropping its output equals that
  FFN's).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from damex.config import CapacityGroup, RoutingMode, choices
from damex.moe.dispatch import capacity_per_group, combine, dispatch, group_index, plan_dispatch
from damex.moe.expert_choice import expert_choice_capacity, plan_expert_choice
from damex.moe.experts import ExpertFFN, Experts
from damex.moe.parallel import ProcessGroupRef, expert_parallel_forward
from damex.moe.router import TopKRouter
from damex.moe.types import RoutingInfo

__all__ = ["EXPERT_INITS", "MoEFFN"]

EXPERT_INITS = ("independent", "identical", "zero_out")


def _check_options(
    *, expert_init: str, unit_gate: bool, top_k: int, capacity_group: str, routing: str
) -> None:
    """:class:`MoEFFN`'s checks of its string options and of ``unit_gate`` (``ValueError``)."""
    if expert_init not in EXPERT_INITS:
        raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {expert_init!r}")
    if unit_gate and top_k != 1:
        raise ValueError(f"unit_gate needs top_k=1 (one gate set to 1), got top_k={top_k}")
    if capacity_group not in choices(CapacityGroup):
        raise ValueError(f"capacity_group must be 'image' or 'batch', got {capacity_group!r}")
    if routing not in choices(RoutingMode):
        raise ValueError(f"routing must be one of {choices(RoutingMode)}, got {routing!r}")


class MoEFFN(nn.Module):
    """Sparse mixture-of-experts feed-forward block (docs/design.md §2.3).

    ``y_t = sum_j kept_tj * gate_tj * Expert_{e_tj}(x_t)``: a linear (or cosine) router with
    train-time noise picks the top-k experts of each token; each (capacity group, expert) pair
    takes at most ``C_g`` assignments, highest gate first (batch-prioritized routing); dropped
    assignments contribute 0.

    Args:
        d_model: token width ``d``.
        hidden_dim: expert hidden width ``h``.
        num_experts: ``E`` (global; independent of the world size).
        top_k: experts per token.
        capacity_factor: ``C_g = max(1, floor(|cf| * k * T_g / E))``; 0 = no drop; < 0 =
            tutel's capped dynamic capacity, which drops the same tokens as ``|cf|``.
        capacity_group: ``"image"`` (one group per ``token_image`` value; official with one
            image per GPU) or ``"batch"`` (all tokens of the call).
        gate_noise: train-time logit noise ``N(0, 1) * gate_noise / E``.
        router: ``"linear"`` (no bias) or ``"cosine"``.
        routing: ``"token_choice"`` (each token its top-k experts) or ``"expert_choice"``
            (each expert its top-C tokens per capacity group, Zhou et al. 2022; see
            :mod:`damex.moe.expert_choice`; ``RoutingInfo.expert`` then lists all E experts
            of a token by its score and ``kept`` marks those that took it).
        activation: expert activation (``"gelu"`` in DAMEX).
        dropout: dropout inside the experts.
        fc2_bias: trainable fc2 bias (True) or none (False). The official frozen-random fc2
            bias (docs/design.md §3.4 Q9) is deliberately not reproduced.
        normalize_gate: renormalize the k gates of a token (k > 1).
        expert_parallel_group: a process group to spread the experts over (``E % W == 0``);
            None = all experts local. All ranks must construct the layer from the same RNG
            state so that the shards together equal the single-process experts.
        cpu_threads: expert GEMM threading on CPU (see :func:`damex.moe.experts.expert_ffn`).
        shared_expert: also pass every token through one shared FFN (same hidden width and
            activation) and add its output (DeepSeekMoE).
        unit_gate: combine weight 1 in value, gradient of the gate (straight-through).
        base_experts: experts ``0..B-1`` predate the others (``damex extend``): their gates
            ignore the added experts (:class:`~damex.moe.router.TopKRouter`) and the capacity
            per expert stays the one of ``B`` experts. 0 = off.
        expert_init: ``"independent"`` (each expert its own random init), ``"identical"``
            (all experts copies of expert 0) or ``"zero_out"`` (fc2 of every routed expert
            zero: the routed part starts as 0, so with ``shared_expert`` the layer starts as the
            shared FFN alone and the routed experts grow as per-dataset residuals, like a
            zero-initialised residual branch).
        router_detach: route a detached copy of ``x``: the routing losses and the gates then
            train the router's weights only, not the token features it reads.
        router_context: the router reads ``[x ; c]``, ``c`` the mean over the token's image of
            the tokens marked by ``context_mask`` (an image-level context: an image's tokens can
            agree on one expert; it needs to know which tokens share an image, never a dataset
            id). The router's weight is then ``[E, 2d]``.
    """

    def __init__(
        self,
        *,
        d_model: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float = 1.25,
        capacity_group: str = "image",
        gate_noise: float = 1.0,
        router: str = "linear",
        routing: str = "token_choice",
        activation: str = "gelu",
        dropout: float = 0.0,
        fc2_bias: bool = True,
        normalize_gate: bool = False,
        expert_parallel_group: dist.ProcessGroup | None = None,
        cpu_threads: bool | None = None,
        shared_expert: bool = False,
        unit_gate: bool = False,
        base_experts: int = 0,
        expert_init: str = "independent",
        router_detach: bool = False,
        router_context: bool = False,
    ) -> None:
        super().__init__()
        _check_options(
            expert_init=expert_init,
            unit_gate=unit_gate,
            top_k=top_k,
            capacity_group=capacity_group,
            routing=routing,
        )
        self.routing = routing
        self.d_model = d_model
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = float(capacity_factor)
        self.capacity_group = capacity_group
        self.router_context = bool(router_context)
        self.router = TopKRouter(
            d_model=2 * d_model if router_context else d_model,
            num_experts=num_experts,
            top_k=top_k,
            gate_noise=gate_noise,
            kind=router,
            normalize_gate=normalize_gate,
            base_experts=base_experts,
        )
        # All ranks build every expert from the same RNG state, then keep their own shard, so
        # the shards together equal the single-process layer's experts.
        self.experts = Experts(
            num_experts=num_experts,
            d_model=d_model,
            hidden_dim=hidden_dim,
            activation=activation,
            dropout=dropout,
            fc2_bias=fc2_bias,
            cpu_threads=cpu_threads,
        )
        self._init_experts_(expert_init)
        self.unit_gate = bool(unit_gate)
        self.router_detach = bool(router_detach)
        # the shared expert is built after the routed ones so that shared_expert=False leaves
        # the RNG stream (hence the routed experts' init) unchanged
        self.shared = (
            ExpertFFN(
                d_model=d_model,
                hidden_dim=hidden_dim,
                activation=activation,
                dropout=dropout,
                fc2_bias=fc2_bias,
            )
            if shared_expert
            else None
        )
        self._spread_experts_(expert_parallel_group)

    def _init_experts_(self, expert_init: str) -> None:
        """Apply ``expert_init`` to the freshly built routed experts."""
        if expert_init == "identical":
            first = self.experts[0]
            self.experts.load_dense_(first.fc1, first.fc2)
        elif expert_init == "zero_out":
            self.experts.zero_output_()
        self.expert_init = expert_init

    def _spread_experts_(self, group: dist.ProcessGroup | None) -> None:
        """Keep this rank's ``E / W`` experts of ``group``; ``expert_offset`` is the first's index.

        None keeps all experts (offset 0).
        """
        # held by reference: a deep copy of the layer (its EMA) talks to the same group
        self._ep_group = None if group is None else ProcessGroupRef(group)
        self.expert_offset = 0
        if group is None:
            return
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if self.num_experts % world != 0:
            raise ValueError(
                f"expert parallelism needs num_experts % world_size == 0, "
                f"got {self.num_experts} experts on {world} ranks"
            )
        local = self.num_experts // world
        self.expert_offset = rank * local
        self.experts.keep_(range(self.expert_offset, self.expert_offset + local))

    @property
    def expert_parallel_group(self) -> dist.ProcessGroup | None:
        """The process group the experts are spread over (None: all experts local)."""
        return None if self._ep_group is None else self._ep_group.group

    @property
    def num_local_experts(self) -> int:
        return self.experts.num_experts

    def extra_repr(self) -> str:
        return (
            f"capacity_factor={self.capacity_factor}, capacity_group={self.capacity_group}, "
            f"expert_offset={self.expert_offset}, shared_expert={self.shared is not None}, "
            f"unit_gate={self.unit_gate}, expert_init={self.expert_init}, routing={self.routing}, "
            f"router_detach={self.router_detach}"
        )

    def router_input(
        self, x: Tensor, token_image: Tensor | None, context_mask: Tensor | None
    ) -> Tensor:
        """What the router reads: ``x`` (detached with ``router_detach``), with
        ``router_context`` concatenated with the mean of its image's ``context_mask`` tokens."""
        rx = x.detach() if self.router_detach else x
        if not self.router_context:
            return rx
        image = token_image if token_image is not None else x.new_zeros(len(x), dtype=torch.long)
        weight = rx.new_ones(len(x)) if context_mask is None else context_mask.to(rx.dtype)  # [T]
        num_images = int(image.max()) + 1 if len(image) else 0
        total = rx.new_zeros(num_images, rx.shape[1]).index_add_(0, image, rx * weight[:, None])
        count = rx.new_zeros(num_images).index_add_(0, image, weight).clamp_min(1.0)
        return torch.cat([rx, (total / count[:, None])[image]], dim=-1)  # [T, 2d]

    def forward(
        self, x: Tensor, token_image: Tensor | None = None, context_mask: Tensor | None = None
    ) -> tuple[Tensor, RoutingInfo]:
        """Route, dispatch, compute and combine.

        Args:
            x: ``[T, d]`` tokens (already normalized by the caller if pre-norm).
            token_image: ``int64 [T]`` image index of each token (capacity groups and, later,
                the DAMEX targets); None = all tokens in one group, ``token_image`` all zeros.
            context_mask: ``bool [T]``, the tokens averaged into the router's image context
                (``router_context``); None = all.

        Returns:
            ``y [T, d]`` (only the expert mixture: zero rows for dropped tokens; in the autocast
            dtype under autocast) and the :class:`RoutingInfo`.
        """
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"MoEFFN expects x of shape [T, {self.d_model}], got {tuple(x.shape)}")
        num_tokens = x.shape[0]
        if token_image is not None and tuple(token_image.shape) != (num_tokens,):
            raise ValueError(
                f"token_image must be [T={num_tokens}], got {tuple(token_image.shape)}"
            )
        route = self.router(self.router_input(x, token_image, context_mask))  # logits/expert/gate
        group, num_groups = group_index(token_image, num_tokens, self.capacity_group, x.device)
        sizes = torch.bincount(group, minlength=num_groups)
        if self.routing == "expert_choice":  # every expert takes its top-C tokens per group
            capacity = expert_choice_capacity(
                sizes,
                num_experts=self.num_experts,
                top_k=self.top_k,
                capacity_factor=self.capacity_factor,
            )
            expert, gate, plan = plan_expert_choice(route.scores, group, num_groups, capacity)
            route = replace(route, expert=expert, gate=gate)  # [T, E] each
        else:
            capacity = capacity_per_group(
                sizes,
                # an extended layer keeps its old experts' capacity (base_experts: damex extend)
                num_experts=self.router.base_experts or self.num_experts,
                top_k=self.top_k,
                capacity_factor=self.capacity_factor,
            )
            plan = plan_dispatch(
                route.expert, route.gate, group, num_groups, self.num_experts, capacity
            )
        routed = dispatch(x, plan)  # [N, d], expert-sorted
        if self.expert_parallel_group is None:
            out = self.experts(routed, plan.counts)  # [N, d]
        else:
            out = expert_parallel_forward(
                self.experts, routed, plan.counts, self.expert_parallel_group
            )
        gate = route.gate
        if self.unit_gate:
            gate = gate - gate.detach() + 1.0  # value 1, d/dgate = 1 (straight-through)
        y = combine(out, plan, gate, num_tokens)  # [T, d]
        if self.shared is not None:
            y = y + self.shared(x).to(y.dtype)
        if token_image is None:
            token_image = torch.zeros(num_tokens, dtype=torch.long, device=x.device)
        info = RoutingInfo(
            logits=route.logits,
            noisy_logits=route.noisy_logits,
            expert=route.expert,
            gate=route.gate,
            kept=plan.kept,
            token_image=token_image,
        )
        return y, info
