"""Routing statistics accumulated over many batches (dataset x expert histograms per layer).

Everything is counted on the CPU in integer (or float64) tensors, so that merging shards and
all-reducing across processes is exact and order independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from damex.moe.types import RoutingInfo

__all__ = ["RoutingStats"]

_COUNT_FIELDS = ("tokens", "top1", "assigned", "dropped", "correct")
_FLOAT_FIELDS = ("entropy_sum",)


class RoutingStats:
    """Per-layer, per-(dataset, expert) routing counters.

    Attributes (all on CPU):
        tokens: ``int64 [L, D]`` selected tokens per dataset.
        top1: ``int64 [L, D, E]`` tokens of dataset d whose first choice is expert e.
        assigned: ``int64 [L, D, E]`` routing assignments (all k choices) to expert e.
        dropped: ``int64 [L, D, E]`` of those, dropped by the capacity.
        entropy_sum: ``float64 [L, D]`` sum of the router entropy (nats, clean softmax).
        correct: ``int64 [L, D]`` tokens whose first choice is the mapped expert of their
            dataset (stays 0 without an expert map).

    Args:
        num_layers: ``L`` MoE layers.
        num_datasets: ``D``.
        num_experts: ``E``.
        expert_map: optional ``D`` expert ids (dataset index -> expert), for the accuracy.
    """

    def __init__(
        self,
        num_layers: int,
        num_datasets: int,
        num_experts: int,
        expert_map: Sequence[int] | Tensor | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.num_datasets = num_datasets
        self.num_experts = num_experts
        self.expert_map: Tensor | None = None
        if expert_map is not None:
            emap = torch.as_tensor(expert_map, dtype=torch.long).cpu()
            if tuple(emap.shape) != (num_datasets,):
                raise ValueError(
                    f"expert_map must have {num_datasets} entries, got {tuple(emap.shape)}"
                )
            if bool(((emap < 0) | (emap >= num_experts)).any()):
                raise ValueError(
                    f"expert_map ids must be in [0, {num_experts}), got {emap.tolist()}"
                )
            self.expert_map = emap
        L, D, E = num_layers, num_datasets, num_experts
        self.tokens = torch.zeros(L, D, dtype=torch.long)
        self.top1 = torch.zeros(L, D, E, dtype=torch.long)
        self.assigned = torch.zeros(L, D, E, dtype=torch.long)
        self.dropped = torch.zeros(L, D, E, dtype=torch.long)
        self.correct = torch.zeros(L, D, dtype=torch.long)
        self.entropy_sum = torch.zeros(L, D, dtype=torch.float64)

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(
        self,
        infos: Sequence[RoutingInfo],
        image_dataset: Tensor,
        token_masks: Sequence[Tensor | None] | None = None,
    ) -> None:
        """Add one batch.

        Args:
            infos: one :class:`RoutingInfo` per MoE layer (``L`` of them).
            image_dataset: ``int64 [B]`` dataset index of each image; ``-1`` = skip its tokens.
            token_masks: per layer ``bool [T]`` tokens to count, or None (all).
        """
        if len(infos) != self.num_layers:
            raise ValueError(f"got {len(infos)} routing infos for {self.num_layers} layers")
        masks = [None] * len(infos) if token_masks is None else list(token_masks)
        if len(masks) != len(infos):
            raise ValueError(f"got {len(masks)} token masks for {len(infos)} routing infos")
        D, E = self.num_datasets, self.num_experts
        image_dataset = image_dataset.detach().cpu().long()
        for layer, (info, mask) in enumerate(zip(infos, masks)):
            if info.num_experts != E:
                raise ValueError(
                    f"layer {layer}: RoutingInfo has {info.num_experts} experts, stats expect {E}"
                )
            dataset = image_dataset[info.token_image.detach().cpu()]  # [T]
            valid = dataset >= 0
            if mask is not None:
                valid &= mask.detach().cpu()
            if bool((dataset[valid] >= D).any()):
                raise ValueError(f"dataset id {int(dataset.max())} >= num_datasets {D}")
            dataset = dataset[valid]  # [T']
            expert = info.expert.detach().cpu()[valid]  # [T', k]
            kept = info.kept.detach().cpu()[valid]  # [T', k]
            logits = info.logits.detach().float().cpu()[valid]  # [T', E]
            top1 = expert[:, 0]
            self.tokens[layer] += torch.bincount(dataset, minlength=D)
            self.top1[layer] += torch.bincount(dataset * E + top1, minlength=D * E).view(D, E)
            flat = (dataset.unsqueeze(1) * E + expert).reshape(-1)  # [T' k]
            self.assigned[layer] += torch.bincount(flat, minlength=D * E).view(D, E)
            drop = flat[~kept.reshape(-1)]
            self.dropped[layer] += torch.bincount(drop, minlength=D * E).view(D, E)
            logp = torch.log_softmax(logits.double(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)  # [T']
            self.entropy_sum[layer].index_add_(0, dataset, entropy)
            if self.expert_map is not None:
                hit = top1 == self.expert_map[dataset]
                self.correct[layer] += torch.bincount(dataset[hit], minlength=D)

    def _check_compatible(self, other: RoutingStats) -> None:
        shape = (self.num_layers, self.num_datasets, self.num_experts)
        other_shape = (other.num_layers, other.num_datasets, other.num_experts)
        if shape != other_shape:
            raise ValueError(f"cannot merge RoutingStats of shape {other_shape} into {shape}")
        same_map = (self.expert_map is None and other.expert_map is None) or (
            self.expert_map is not None
            and other.expert_map is not None
            and torch.equal(self.expert_map, other.expert_map)
        )
        if not same_map:
            raise ValueError("cannot merge RoutingStats with different expert maps")

    def merge_(self, other: RoutingStats) -> RoutingStats:
        """Add ``other``'s counters into these (in place); returns ``self``."""
        self._check_compatible(other)
        for name in _COUNT_FIELDS + _FLOAT_FIELDS:
            getattr(self, name).add_(getattr(other, name))
        return self

    def all_reduce_(self, group: dist.ProcessGroup | None = None) -> RoutingStats:
        """Sum the counters over the processes of ``group`` (in place); returns ``self``."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        counts = torch.cat([getattr(self, n).reshape(-1) for n in _COUNT_FIELDS]).to(device)
        floats = torch.cat([getattr(self, n).reshape(-1) for n in _FLOAT_FIELDS]).to(device)
        dist.all_reduce(counts, group=group)
        dist.all_reduce(floats, group=group)
        for flat, fields in ((counts.cpu(), _COUNT_FIELDS), (floats.cpu(), _FLOAT_FIELDS)):
            offset = 0
            for name in fields:
                t = getattr(self, name)
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        return self

    # ------------------------------------------------------------------ derived numbers
    def fractions(self) -> Tensor:
        """``float64 [L, D, E]``: share of dataset d's tokens whose first choice is e."""
        return self.top1.double() / self.tokens.unsqueeze(-1).clamp_min(1).double()

    def expert_load(self) -> Tensor:
        """``float64 [L, E]``: share of all assignments that went to each expert."""
        per_expert = self.assigned.sum(1).double()
        return per_expert / per_expert.sum(-1, keepdim=True).clamp_min(1)

    def drop_rate(self) -> Tensor:
        """``float64 [L, D]``: dropped / routed assignments per dataset."""
        return self.dropped.sum(-1).double() / self.assigned.sum(-1).clamp_min(1).double()

    def mean_entropy(self) -> Tensor:
        """``float64 [L, D]``: mean router entropy (nats)."""
        return self.entropy_sum / self.tokens.clamp_min(1).double()

    def accuracy(self) -> Tensor | None:
        """``float64 [L]``: share of tokens routed (first choice) to their dataset's expert."""
        if self.expert_map is None:
            return None
        return self.correct.sum(-1).double() / self.tokens.sum(-1).clamp_min(1).double()

    def accuracy_per_dataset(self) -> Tensor | None:
        """``float64 [L, D]``, or None without an expert map."""
        if self.expert_map is None:
            return None
        return self.correct.double() / self.tokens.clamp_min(1).double()

    def summary(self) -> dict[str, Any]:
        """JSON-able derived numbers (fractions, load, drop rate, entropy, accuracy)."""
        acc = self.accuracy()
        acc_d = self.accuracy_per_dataset()
        return {
            "fractions": self.fractions().tolist(),
            "expert_load": self.expert_load().tolist(),
            "drop_rate": self.drop_rate().tolist(),
            "mean_entropy": self.mean_entropy().tolist(),
            "accuracy": None if acc is None else acc.tolist(),
            "accuracy_per_dataset": None if acc_d is None else acc_d.tolist(),
        }

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-able raw counters; :meth:`from_dict` restores them exactly."""
        out: dict[str, Any] = {
            "num_layers": self.num_layers,
            "num_datasets": self.num_datasets,
            "num_experts": self.num_experts,
            "expert_map": None if self.expert_map is None else self.expert_map.tolist(),
        }
        for name in _COUNT_FIELDS + _FLOAT_FIELDS:
            out[name] = getattr(self, name).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingStats:
        """Inverse of :meth:`to_dict`."""
        try:
            stats = cls(
                int(data["num_layers"]),
                int(data["num_datasets"]),
                int(data["num_experts"]),
                data.get("expert_map"),
            )
            for name in _COUNT_FIELDS + _FLOAT_FIELDS:
                t = getattr(stats, name)
                value = torch.tensor(data[name], dtype=t.dtype)
                if value.shape != t.shape:
                    raise ValueError(
                        f"field {name!r}: expected shape {tuple(t.shape)}, got {tuple(value.shape)}"
                    )
                t.copy_(value)
        except KeyError as err:
            raise ValueError(f"RoutingStats.from_dict: missing key {err}") from None
        return stats
