"""Expert parallelism over ``torch.distributed`` (optional; all experts are local by default).

With a process group of world size ``W`` and ``E % W == 0``, rank ``r`` holds experts
``[r * E/W, (r + 1) * E/W)``. Routing, capacity and combine stay on the token's own rank (the
capacity groups are the rank's images, or its whole batch: the official per-process capacity).
The kept assignments, already sorted by global expert, travel to the expert's rank with one
uneven ``all_to_all_single``, are regrouped by local expert, computed, and travel back.

Gradients: :func:`all_to_all_autograd` is differentiable (the backward is the reverse
all-to-all). Expert parameters are rank-local, so DDP must not all-reduce (nor broadcast) them:
call :func:`ignore_expert_params_in_ddp` on the model **before** wrapping it in DDP.

Gradient scaling: DDP *averages* the replicated gradients over ranks, i.e. it optimizes
``mean_r L_r``. A rank's expert gradient already *sums* the contributions of the tokens of all
ranks (``sum_r dL_r/dθ``), so it must be divided by ``W`` to be the gradient of the same
objective: call :func:`scale_expert_grads_` with ``1/W`` after the backward (tutel/DAMEX do the
same). Gradient clipping by global norm must then all-reduce the squared norm of the expert
gradients (which differ per rank) before combining it with the replicated part; checkpoints
gather the shards (``damex.engine.expert_parallel`` does both).

A model whose expert-parallel layers must all run together: every rank calls the layers in
the same order, once per forward. A rank with nothing to compute (e.g. at the end of an
uneven evaluation shard) joins the others' all-to-alls with :func:`idle_expert_parallel_forward`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from damex.moe.experts import Experts

__all__ = [
    "ProcessGroupRef",
    "all_to_all_autograd",
    "expert_parallel_forward",
    "expert_parallel_layers",
    "expert_parameter_names",
    "idle_expert_parallel_forward",
    "ignore_expert_params_in_ddp",
    "scale_expert_grads_",
]


class ProcessGroupRef:
    """A process group held by a module, shared (not copied) by ``copy.deepcopy``.

    A ``ProcessGroup`` cannot be deep-copied or pickled, and a copy of an expert-parallel model
    (its EMA, say) must talk to the same group as the original.
    """

    __slots__ = ("group",)

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __copy__(self) -> ProcessGroupRef:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> ProcessGroupRef:
        return self

    def __repr__(self) -> str:
        return f"ProcessGroupRef(size={dist.get_world_size(self.group)})"


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
    # tokens travel in the experts' parameter dtype, so that every rank (an idle one too, see
    # idle_expert_parallel_forward) agrees on the element type of the exchanged rows
    x = x.to(next(experts.parameters()).dtype)
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


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every MoE layer of ``model`` whose experts are spread over ranks.

    A layer qualifies when it has an ``experts`` (:class:`Experts`) and a non-None
    ``expert_parallel_group``; the order is ``named_modules`` order (the forward order of the
    DINO decoder).
    """
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if getattr(module, "expert_parallel_group", None) is not None and isinstance(
            experts, Experts
        ):
            found.append((name, module))
    return found


def _expert_parallel_modules(model: nn.Module) -> list[tuple[str, Experts]]:
    return [
        (f"{name}.experts" if name else "experts", layer.experts)
        for name, layer in expert_parallel_layers(model)
    ]


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
    """Tell DDP (constructed afterwards) not to broadcast nor all-reduce the rank-local experts.

    Uses ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``: PyTorch has
    no public API to exclude parameters of a wrapped module (pytorch/pytorch#43690); this
    static method is the documented workaround (TorchRec uses it) and, unlike setting
    ``_ddp_params_and_buffers_to_ignore`` by hand, also marks the tensors ``_ddp_ignored``.
    Names already ignored are kept.

    Returns:
        The expert parameter names (now ignored).
    """
    from torch.nn.parallel import DistributedDataParallel

    names = expert_parameter_names(model)
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, sorted(set(existing) | set(names))
    )
    return names


@torch.no_grad()
def scale_expert_grads_(model: nn.Module, factor: float) -> int:
    """Multiply the gradients of the rank-local expert parameters by ``factor`` (use ``1/W``).

    Call once per optimizer step, after the last backward and before clipping.

    Returns:
        The number of gradients scaled.
    """
    grads = [
        p.grad
        for _, experts in _expert_parallel_modules(model)
        for p in experts.parameters()
        if p.grad is not None
    ]
    if grads:
        torch._foreach_mul_(grads, factor)
    return len(grads)


@torch.no_grad()
def idle_expert_parallel_forward(model: nn.Module) -> int:
    """Join one forward of the other ranks' expert-parallel layers with no tokens of our own.

    Runs every expert-parallel layer's all-to-alls (in ``named_modules`` order, the order the
    forward calls them) with zero local rows, computing this rank's experts on the rows the
    other ranks send. Call it under the same autocast as their forward.

    Returns:
        The number of layers run.
    """
    layers = expert_parallel_layers(model)
    for _, layer in layers:
        experts: Experts = layer.experts
        param = next(experts.parameters())
        x = param.new_zeros(0, experts.d_model)  # [0, d]
        counts = [0] * (experts.num_experts * dist.get_world_size(layer.expert_parallel_group))
        expert_parallel_forward(experts, x, counts, layer.expert_parallel_group)
    return len(layers)
