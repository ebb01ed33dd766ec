"""Expert parallelism in training, checkpoints and inference (the collective-dependent parts).

A model built with ``moe.expert_parallel=true`` under ``torchrun`` (``damex.modeling.build``)
holds ``E/W`` experts of every MoE layer on each of the ``W`` ranks; everything else is
replicated. This module makes the rest of the engine treat it like the replicated model:

- **DDP** (:func:`wrap_ddp`): the expert parameters are excluded from DDP's broadcast and
  all-reduce (each rank owns different experts; see
  :func:`damex.moe.parallel.ignore_expert_params_in_ddp` for why DDP's static
  ``_set_params_and_buffers_to_ignore_for_model`` is used).
- **Gradients** (:func:`finish_expert_grads_`): DDP averages the shared gradients over the
  ranks; an expert's gradient, through the reverse all-to-all, already *sums* the contributions
  of every rank's tokens. Dividing it by ``W`` makes it equal to the replicated run's averaged
  gradient (tested to 1e-5 against a replicated 2-rank run).
- **Clipping** (:func:`clip_grad_norm_`): the global 2-norm over all ranks' parameters, shared
  parameters counted once and every expert once: ``sqrt(|g_shared|^2 + sum_r |g_experts,r|^2)``.
- **Checkpoints** (:func:`gather_model_state`, :func:`gather_optimizer_state`,
  :func:`gather_ema_state` and the ``load_*`` functions): saving gathers every rank's experts on
  rank 0 into the state a single process would have (same keys, same optimizer layout, plus
  each group's ``param_names``), so a checkpoint does not depend on ``W``: it resumes on any
  number of processes (expert-parallel or not) and loads on one process for evaluation, the
  routing report, the demo and the predictor. Loading keeps the rank's own experts.
- **Inference** (:func:`inference_lockstep`): evaluation shards can be uneven, but every rank
  must run each all-to-all; a rank out of batches joins the others' forwards with no tokens.

Without expert-parallel layers (or with ``W = 1``) every function falls back to the plain
single-model behaviour, so the trainer can call them unconditionally.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from damex.engine import checkpoint as ckpt
from damex.engine.ema import ModelEMA, unwrap_model
from damex.errors import CheckpointError
from damex.moe.parallel import (
    expert_parallel_layers,
    idle_expert_parallel_forward,
    ignore_expert_params_in_ddp,
    scale_expert_grads_,
)

__all__ = [
    "expert_parallel_group",
    "expert_prefixes",
    "wrap_ddp",
    "finish_expert_grads_",
    "clip_grad_norm_",
    "gather_model_state",
    "local_model_state",
    "load_model_state",
    "gather_optimizer_state",
    "load_optimizer_state",
    "gather_ema_state",
    "load_ema_state",
    "inference_lockstep",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ layout
def expert_parallel_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group the experts of ``model`` are spread over (None: none are).

    Raises:
        ValueError: the layers use different groups (not supported).
    """
    groups = {id(layer.expert_parallel_group): layer.expert_parallel_group for _, layer in
              expert_parallel_layers(unwrap_model(model))}  # fmt: skip
    if len(groups) > 1:
        raise ValueError("the expert-parallel MoE layers use different process groups")
    return next(iter(groups.values()), None)


def expert_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes (``<layer>.experts.``) of the rank-local experts of ``model``."""
    return [f"{name}.experts." for name, _ in expert_parallel_layers(unwrap_model(model))]


def _prefix_of(key: str, prefixes: list[str]) -> str | None:
    return next((p for p in prefixes if key.startswith(p)), None)


def _expert_id(key: str, prefix: str) -> int:
    """``<prefix>ffn.<id>.fc1.weight`` -> ``id`` (experts are keyed by global id)."""
    parts = key[len(prefix) :].split(".")
    if len(parts) < 2 or parts[0] != "ffn" or not parts[1].isdigit():
        raise CheckpointError(f"unexpected expert key {key!r} (expected {prefix}ffn.<id>....)")
    return int(parts[1])


def _active(model: nn.Module) -> tuple[dist.ProcessGroup | None, list[str]]:
    """(group, expert prefixes) when ``model`` is expert-parallel over > 1 rank, else (None, [])."""
    group = expert_parallel_group(model)
    if group is None or dist.get_world_size(group) == 1:
        return None, []
    return group, expert_prefixes(model)


def _gather_to(obj: Any, dst: int, group: dist.ProcessGroup) -> list[Any] | None:
    """``gather_object`` onto global rank ``dst`` (tensors travel on the CPU)."""
    out: list[Any] | None = None
    if dist.get_rank() == dst:
        out = [None] * dist.get_world_size(group)
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def _merge_runs(per_rank: list[list[str]], prefixes: list[str]) -> list[str]:
    """Merge the ranks' name lists into the single-process order.

    Rank ``r`` holds experts ``[r E/W, (r+1) E/W)``, so within one layer the single-process
    order (ascending global id) is rank 0's run of that layer's expert names, then rank 1's, ...
    Everything else is identical on every rank and taken from rank 0.
    """
    out: list[str] = []
    emitted: set[str] = set()
    for name in per_rank[0]:
        prefix = _prefix_of(name, prefixes)
        if prefix is None:
            out.append(name)
        elif prefix not in emitted:
            emitted.add(prefix)
            for names in per_rank:
                out += [n for n in names if n.startswith(prefix)]
    expected = len(per_rank[0]) + sum(
        1 for names in per_rank[1:] for n in names if _prefix_of(n, prefixes) is not None
    )
    if len(out) != expected:
        raise RuntimeError(
            f"cannot merge the expert shards: {len(out)} names merged, {expected} held (do the "
            "ranks hold the same layers and parameter groups?)"
        )
    return out


# -------------------------------------------------------------------- DDP and gradients
def wrap_ddp(
    model: nn.Module,
    *,
    device: torch.device,
    find_unused_parameters: bool = True,
) -> nn.Module:
    """``DistributedDataParallel(model)`` with the rank-local experts excluded from DDP.

    Args:
        model: the unwrapped model (already on ``device``).
        device: this rank's device (CUDA: ``device_ids=[device.index]``).
        find_unused_parameters: DDP's flag (the detector has parameters without a gradient in
            some steps: experts without tokens, the DN label table without GT).
    """
    from torch.nn.parallel import DistributedDataParallel

    ignored = ignore_expert_params_in_ddp(model)
    if ignored:
        logger.info("DDP: %d rank-local expert tensors excluded from all-reduce", len(ignored))
    kwargs: dict[str, Any] = {"find_unused_parameters": find_unused_parameters}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
    return DistributedDataParallel(model, **kwargs)


def finish_expert_grads_(model: nn.Module) -> None:
    """Divide the rank-local expert gradients by ``W`` (call once per step, before clipping).

    After it, every gradient is the gradient of the replicated run's objective ``mean_r L_r``:
    DDP averaged the shared ones; the experts' summed all ranks' tokens. No-op without expert
    parallelism.
    """
    group, _ = _active(model)
    if group is not None:
        scale_expert_grads_(unwrap_model(model), 1.0 / dist.get_world_size(group))


def clip_grad_norm_(
    model: nn.Module, parameters: Iterable[nn.Parameter], max_norm: float
) -> Tensor:
    """Clip ``parameters``' gradients by the global 2-norm over all ranks' parameters.

    Without expert parallelism this is ``torch.nn.utils.clip_grad_norm_``. With it, the
    shared (replicated, already all-reduced) gradients count once and every rank's experts
    once: ``total = sqrt(|shared|^2 + all_reduce_sum(|local experts|^2))``; the same
    coefficient ``min(1, max_norm / (total + 1e-6))`` is applied everywhere, so every rank
    agrees on ``total`` (NaN/inf included).

    Args:
        model: the (possibly DDP-wrapped) model the parameters belong to.
        parameters: the optimizer's parameters (this rank's experts included).
        max_norm: ``inf`` computes the norm without clipping.

    Returns:
        The total norm (a scalar tensor, identical on every rank).
    """
    params = [p for p in parameters if p.grad is not None]
    group, _ = _active(model)
    if group is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    expert_ids = {
        id(p) for _, layer in expert_parallel_layers(unwrap_model(model))
        for p in layer.experts.parameters()
    }  # fmt: skip
    shared = [p.grad for p in params if id(p) not in expert_ids]
    local = [p.grad for p in params if id(p) in expert_ids]
    device = params[0].grad.device if params else torch.device("cpu")
    zero = torch.zeros((), device=device)
    shared_sq = torch.nn.utils.get_total_norm(shared).float() ** 2 if shared else zero
    local_sq = torch.nn.utils.get_total_norm(local).float() ** 2 if local else zero
    comm_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    experts_sq = local_sq.detach().reshape(1).to(comm_device, torch.float64)
    dist.all_reduce(experts_sq, op=dist.ReduceOp.SUM, group=group)
    total = (shared_sq.double() + experts_sq.to(device)[0]).sqrt().float()
    if max_norm != float("inf") and params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ------------------------------------------------------------------- model state dicts
def _strip_ddp(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def gather_model_state(model: nn.Module, *, dst: int = 0) -> dict[str, Tensor] | None:
    """The single-process state dict of ``model``, assembled on rank ``dst`` (collective).

    Every rank must call it. Expert-parallel: the other ranks' experts are gathered (on the
    CPU) and inserted in global-id order, so the keys and their order are those of the same
    model built in one process. Otherwise: ``state_dict()`` on every rank.

    Returns:
        The state dict on rank ``dst``; None on the other ranks (expert-parallel only).
    """
    net = unwrap_model(model)
    state = net.state_dict()
    group, prefixes = _active(net)
    if group is None:
        return state
    mine = {k: v.detach().cpu() for k, v in state.items() if _prefix_of(k, prefixes)}
    shards = _gather_to(mine, dst, group)
    if shards is None:
        return None
    out: dict[str, Tensor] = {}
    emitted: set[str] = set()
    for key, value in state.items():
        prefix = _prefix_of(key, prefixes)
        if prefix is None:
            out[key] = value
        elif prefix not in emitted:
            emitted.add(prefix)
            for shard in shards:
                out.update((k, v) for k, v in shard.items() if k.startswith(prefix))
    return out


def local_model_state(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The part of a single-process state dict that ``model`` (maybe one shard) holds.

    Drops the experts of expert-parallel layers that live on other ranks (keys carry the
    global expert id); everything else is passed through (a missing or extra key is then
    reported by the strict load).
    """
    state = _strip_ddp(state)
    layers = expert_parallel_layers(unwrap_model(model))
    if not layers:
        return dict(state)
    held = {f"{name}.experts.": set(layer.experts.expert_ids) for name, layer in layers}
    prefixes = list(held)
    out = {}
    for key, value in state.items():
        prefix = _prefix_of(key, prefixes)
        if prefix is None or _expert_id(key, prefix) in held[prefix]:
            out[key] = value
    return out


def load_model_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    path: str | os.PathLike[str],
    strict: bool = True,
) -> None:
    """Load a single-process (``W``-independent) state dict into ``model`` or its shard.

    Args:
        model: the unwrapped model, expert-parallel or not.
        state: e.g. ``checkpoint["model"]`` written by any world size.
        path: the checkpoint, for messages.
        strict: see :func:`damex.engine.checkpoint.load_model_state`.

    Raises:
        CheckpointError: listing missing / unexpected keys and shape mismatches.
    """
    ckpt.load_model_state(
        unwrap_model(model), local_model_state(model, state), path=path, strict=strict
    )


# --------------------------------------------------------------------------- optimizer
def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter names of every optimizer group, in the group's order."""
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    out = []
    for i, group in enumerate(optimizer.param_groups):
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if missing:
            raise ValueError(f"optimizer group {i} holds parameters not in the model: {missing}")
        out.append([names[id(p)] for p in group["params"]])
    return out


def gather_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, dst: int = 0
) -> dict[str, Any] | None:
    """The optimizer state a single process would have, assembled on rank ``dst`` (collective).

    The result is an ordinary ``optimizer.state_dict()`` of the single-process model (states
    indexed in its parameter order) whose groups also carry ``param_names`` (PyTorch's own
    key for them), which is what lets :func:`load_optimizer_state` reshard it for any ``W``.
    The experts' AdamW moments are gathered with the experts.

    Returns:
        The state dict on rank ``dst``; None on the other ranks (expert-parallel only).
    """
    state = optimizer.state_dict()
    names = _group_names(model, optimizer)
    group, prefixes = _active(model)
    flat = [n for g in names for n in g]
    by_name = {flat[i]: v for i, v in state["state"].items()}
    if group is None:
        merged, merged_state = names, by_name
    else:
        mine = {
            "names": names,
            "state": {n: _to_cpu(v) for n, v in by_name.items() if _prefix_of(n, prefixes)},
        }
        shards = _gather_to(mine, dst, group)
        if shards is None:
            return None
        merged = [_merge_runs([s["names"][i] for s in shards], prefixes) for i in range(len(names))]
        merged_state = {n: v for n, v in by_name.items() if not _prefix_of(n, prefixes)}
        for shard in shards:
            merged_state.update(shard["state"])
    out_groups, out_state, start = [], {}, 0
    for saved, group_names in zip(state["param_groups"], merged, strict=True):
        out_groups.append(
            {
                **{k: v for k, v in saved.items() if k not in ("params", "param_names")},
                "params": list(range(start, start + len(group_names))),
                "param_names": list(group_names),
            }
        )
        for i, name in enumerate(group_names, start):
            if name in merged_state:
                out_state[i] = merged_state[name]
        start += len(group_names)
    return {"state": out_state, "param_groups": out_groups}


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def load_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    *,
    path: str | os.PathLike[str],
) -> None:
    """Load a single-process optimizer state into this rank's optimizer (any ``W``).

    With ``param_names`` in the groups (written by :func:`gather_optimizer_state`) the states
    are matched by parameter name, so the rank takes exactly its experts' moments. Without
    them (an older checkpoint) the single-process order is reconstructed from every rank's
    names (a collective under expert parallelism).

    Raises:
        CheckpointError: a different number of groups, or a parameter of this model that the
            checkpoint's group does not hold.
    """
    local_names = _group_names(model, optimizer)
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(local_names):
        raise CheckpointError(
            f"checkpoint {path}: the optimizer state has {len(saved_groups)} parameter groups, "
            f"the model's optimizer {len(local_names)}"
        )
    group, prefixes = _active(model)
    if any("param_names" not in g for g in saved_groups):
        if group is None:
            try:
                optimizer.load_state_dict(dict(state))
            except (ValueError, KeyError) as e:
                raise CheckpointError(
                    f"checkpoint {path}: optimizer state does not match: {e}"
                ) from e
            return
        per_rank: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(per_rank, local_names, group=group)
        saved_names = [
            _merge_runs([r[i] for r in per_rank], prefixes) for i in range(len(local_names))
        ]
    else:
        saved_names = [list(g["param_names"]) for g in saved_groups]
    index = {}
    for i, (names, saved) in enumerate(zip(saved_names, saved_groups, strict=True)):
        if len(names) != len(saved["params"]):
            raise CheckpointError(
                f"checkpoint {path}: optimizer group {i} has {len(saved['params'])} parameters "
                f"but {len(names)} names"
            )
        index.update({n: (i, int(p)) for n, p in zip(names, saved["params"], strict=True)})
    new_groups, new_state, start = [], {}, 0
    for i, (names, saved) in enumerate(zip(local_names, saved_groups, strict=True)):
        absent = [n for n in names if index.get(n, (None,))[0] != i]
        if absent:
            raise CheckpointError(
                f"checkpoint {path}: optimizer group {i} ({saved.get('name', '?')}) lacks "
                f"parameters {absent[:5]}{' ...' if len(absent) > 5 else ''}: was it written "
                "for another model?"
            )
        for j, name in enumerate(names, start):
            saved_index = index[name][1]
            if saved_index in state["state"]:
                new_state[j] = state["state"][saved_index]
        new_groups.append(
            {
                **{k: v for k, v in saved.items() if k not in ("params", "param_names")},
                "params": list(range(start, start + len(names))),
                "param_names": list(names),
            }
        )
        start += len(names)
    try:
        optimizer.load_state_dict({"state": new_state, "param_groups": new_groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not match: {e}") from e


# --------------------------------------------------------------------------------- EMA
def gather_ema_state(ema: ModelEMA, *, dst: int = 0) -> dict[str, Any] | None:
    """``ema.state_dict()`` with the EMA weights gathered like :func:`gather_model_state`."""
    module = gather_model_state(ema.module, dst=dst)
    if module is None:
        return None
    return {**ema.state_dict(), "module": module}


def load_ema_state(ema: ModelEMA, state: Mapping[str, Any]) -> None:
    """Load a (``W``-independent) EMA state into ``ema`` (keeps this rank's experts)."""
    ema.load_state_dict({**state, "module": local_model_state(ema.module, state["module"])})


# --------------------------------------------------------------------------- inference
def inference_lockstep(
    model: nn.Module, has_batch: bool, *, amp_dtype: torch.dtype | None = None
) -> bool:
    """Agree over the ranks whether another inference forward runs (expert parallelism).

    Every rank of an expert-parallel model must take part in every forward's all-to-alls, but
    evaluation shards may be uneven. Call this before each forward: it returns whether any rank
    still has a batch; a rank that has none (``has_batch=False``) but whose peers do has already
    run its part of their forward (with no tokens) when this returns True, and must not run
    the model itself. Without expert parallelism: returns ``has_batch`` (no collective).

    Args:
        model: the model (possibly DDP-wrapped).
        has_batch: whether this rank has a batch to run now.
        amp_dtype: the autocast dtype of the others' forward (None: no autocast).
    """
    group, _ = _active(model)
    if group is None:
        return has_batch
    device = next(unwrap_model(model).parameters()).device
    flag = torch.tensor([float(has_batch)])
    if dist.get_backend(group) == "nccl":
        flag = flag.to(device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    any_batch = bool(flag.item() > 0)
    if any_batch and not has_batch:
        ctx = (
            torch.autocast(device_type=device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            idle_expert_parallel_forward(unwrap_model(model))
    return any_batch
