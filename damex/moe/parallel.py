"""Expert parallelism over ``torch.distributed`` (optional; all experts are local by default).

With a process group of world size ``W`` and ``E % W == 0``, rank ``r`` holds experts
``[r * E/W, (r + 1) * E/W)``. Routing, capacity and combine stay on the token's own rank (the
capacity groups are the rank's images, or its whole batch: the official per-process capacity).
The kept assignments, already sorted by global expert, travel to the expert's rank with one
uneven ``all_to_all_single``, are regrouped by local expert, computed, and travel back.

Gradients: :func:`all_to_all_autograd` is differentiable (the backward is the reverse
all-to-all). Expert parameters are rank-local, so DDP must not all-reduce them:
call :func:`ignore_expert_params_in_ddp` on the model **before** wrapping it in DDP.

Gradient scaling: DDP *averages* the replicated gradients over ranks, i.e. it optimizes
``mean_r L_r``. A rank's expert gradient already *sums* the contributions of the tokens of all
ranks (``sum_r dL_r/dθ``), so it must be divided by ``W`` to be the gradient of the same
objective: :func:`register_expert_grad_scaling` installs those hooks (tutel/DAMEX do the same).
Gradient clipping by global norm must then all-reduce the squared norm of the expert
gradients (which differ per rank) before combining it with the replicated part.
Checkpoints: each rank holds a different shard of the expert parameters (same names, shape
``[E/W, ...]``); save per rank or gather them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from damex.moe.experts import Experts

__all__ = [
    "all_to_all_autograd",
    "expert_parallel_forward",
    "expert_parameter_names",
    "ignore_expert_params_in_ddp",
    "register_expert_grad_scaling",
]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(
            out,
            x.contiguous(),
            output_split_sizes=output_splits,
            input_split_sizes=input_splits,
            group=group,
        )
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None, None, None]:
        out = grad.new_empty(sum(ctx.input_splits), *grad.shape[1:])
        dist.all_to_all_single(
            out,
            grad.contiguous(),
            output_split_sizes=ctx.input_splits,
            input_split_sizes=ctx.output_splits,
            group=ctx.group,
        )
        return out, None, None, None


def all_to_all_autograd(
    x: Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 with uneven splits.

    Args:
        x: ``[sum(input_splits), ...]``; chunk ``i`` goes to rank ``i``.
        output_splits: rows received from each rank.
        input_splits: rows sent to each rank.
        group: process group (None = default).

    Returns:
        ``[sum(output_splits), ...]``, chunks ordered by source rank.
    """
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def expert_parallel_forward(
    experts: Experts,
    x: Tensor,
    counts: list[int],
    group: dist.ProcessGroup | None,
) -> Tensor:
    """Run the global experts on ``x``, each on the rank that holds it.

    Args:
        experts: this rank's ``E/W`` local experts.
        x: ``[N, d]`` this rank's kept assignments, sorted by global expert.
        counts: ``E`` ints, rows of ``x`` per global expert.
        group: the expert-parallel process group.

    Returns:
        ``[N, d]`` expert outputs for the rows of ``x``, in the same order.
    """
    world = dist.get_world_size(group)
    local = experts.num_experts
    if len(counts) != world * local:
        raise ValueError(f"got {len(counts)} expert counts for {world} ranks x {local} experts")
    send_counts = torch.tensor(counts, dtype=torch.long)  # [E], global expert order
    if dist.get_backend(group) == "nccl":
        send_counts = send_counts.to(x.device)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # [W * E_loc], by source rank
    recv_counts = recv_counts.cpu().view(world, local)  # [W, E_loc]
    send_splits = send_counts.cpu().view(world, local).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    recv = all_to_all_autograd(x, recv_splits, send_splits, group)  # [R, d], (source, expert)

    # Regroup (source, expert)-major rows into (expert, source)-major runs.
    seg_len = recv_counts.t().reshape(-1)  # [E_loc * W], (expert, source) order
    seg_src_start = torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)
    seg_src_start = seg_src_start.view(world, local).t().reshape(-1)
    seg_dst_start = torch.cumsum(seg_len, 0) - seg_len
    perm = torch.repeat_interleave(seg_src_start - seg_dst_start, seg_len)
    perm = (perm + torch.arange(perm.numel())).to(x.device)  # new row i <- recv row perm[i]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=x.device)

    out = experts(recv.index_select(0, perm), recv_counts.sum(0).tolist())  # [R, d]
    out = out.index_select(0, inverse)  # back to (source, expert) order
    return all_to_all_autograd(out, send_splits, recv_splits, group)  # [N, d]


def _expert_parallel_modules(model: nn.Module) -> list[tuple[str, Experts]]:
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if getattr(module, "expert_parallel_group", None) is not None and isinstance(
            experts, Experts
        ):
            found.append((f"{name}.experts" if name else "experts", experts))
    return found


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the rank-local (expert-parallel) expert parameters of ``model``.

    Experts of layers without an expert-parallel group are replicated and are not listed.
    """
    return [
        f"{prefix}.{pname}"
        for prefix, experts in _expert_parallel_modules(model)
        for pname, _ in experts.named_parameters()
    ]


def ignore_expert_params_in_ddp(model: nn.Module) -> list[str]:
    """Tell DDP (constructed afterwards) not to all-reduce the rank-local expert parameters.

    Sets ``model._ddp_params_and_buffers_to_ignore`` (the attribute DDP reads at construction),
    keeping names already there.

    Returns:
        The ignored names.
    """
    names = expert_parameter_names(model)
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = sorted(set(existing) | set(names))
    return names


def register_expert_grad_scaling(model: nn.Module, factor: float) -> list[RemovableHandle]:
    """Multiply the gradients of the rank-local expert parameters by ``factor`` (use ``1/W``).

    Returns:
        The hook handles (call ``.remove()`` to undo).
    """
    handles = []
    for _, experts in _expert_parallel_modules(model):
        for param in experts.parameters():
            handles.append(param.register_hook(lambda g, f=factor: g * f))
    return handles
