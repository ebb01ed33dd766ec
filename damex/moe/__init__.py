"""Mixture-of-experts core: router, dispatch, experts, ``MoEFFN``, losses, maps, statistics.

Knows nothing of detection (no ``damex.modeling`` / ``damex.data`` imports).
"""

from damex.moe.dispatch import (
    DispatchPlan,
    capacity_per_group,
    combine,
    dispatch,
    group_index,
    plan_dispatch,
)
from damex.moe.experts import ACTIVATIONS, ExpertFFN, Experts, expert_ffn
from damex.moe.layer import MoEFFN
from damex.moe.losses import (
    MOE_LOSSES,
    damex_loss,
    load_importance_loss,
    moe_loss,
    router_z_loss,
    switch_loss,
)
from damex.moe.mapping import NO_EXPERT, ExpertMap, propose_mapping, validate_expert_map
from damex.moe.parallel import (
    ProcessGroupRef,
    all_to_all_autograd,
    expert_parallel_forward,
    expert_parallel_layers,
    expert_parameter_names,
    idle_expert_parallel_forward,
    ignore_expert_params_in_ddp,
    scale_expert_grads_,
)
from damex.moe.router import ROUTER_KINDS, RouterOutput, TopKRouter
from damex.moe.stats import RoutingStats
from damex.moe.types import RoutingInfo

__all__ = [
    "ACTIVATIONS",
    "MOE_LOSSES",
    "NO_EXPERT",
    "ROUTER_KINDS",
    "DispatchPlan",
    "ExpertFFN",
    "ExpertMap",
    "Experts",
    "MoEFFN",
    "ProcessGroupRef",
    "RouterOutput",
    "RoutingInfo",
    "RoutingStats",
    "TopKRouter",
    "all_to_all_autograd",
    "capacity_per_group",
    "combine",
    "damex_loss",
    "dispatch",
    "expert_ffn",
    "expert_parallel_forward",
    "expert_parallel_layers",
    "expert_parameter_names",
    "group_index",
    "idle_expert_parallel_forward",
    "ignore_expert_params_in_ddp",
    "load_importance_loss",
    "moe_loss",
    "plan_dispatch",
    "propose_mapping",
    "router_z_loss",
    "scale_expert_grads_",
    "switch_loss",
    "validate_expert_map",
]
