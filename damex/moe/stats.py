"""Routing statistics accumulated over many batches (dataset x expert histograms per layer).

Everything is counted on the CPU in integer (or float64) tensors, so that merging shards and
all-reducing across processes is exact and order independent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from damex.moe.types import RoutingInfo

__all__ = [
    "RoutingStats",
    "OrderFreeRouting",
    "order_free_routing",
    "best_assignment",
    "dataset_expert_nmi",
    "routing_entropy",
    "active_experts",
]

_COUNT_FIELDS = ("tokens", "top1", "assigned", "dropped", "correct")
_FLOAT_FIELDS = ("entropy_sum",)


# ---------------------------------------------------------------------- order-free metrics
# All of these read a datasets x experts top-1 count matrix and do not change when the experts
# are renumbered (a column permutation), so they score a vanilla router that never saw the
# configured map as fairly as DAMEX. Datasets without a counted token are left out; every
# dataset that has tokens weighs the same (like the per-dataset AP mean), whatever its size.


def _active_rows(counts: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"counts must be a [D, E] matrix, got shape {tuple(c.shape)}")
    if (c < 0).any() or not np.isfinite(c).all():
        raise ValueError("counts must be finite and non-negative")
    return c


def _shares(c: np.ndarray) -> np.ndarray:
    """Row-normalized ``[D', E]`` shares of the datasets that have tokens."""
    rows = c[c.sum(1) > 0]
    return rows / rows.sum(1, keepdims=True)


def best_assignment(
    counts: np.ndarray | Sequence[Sequence[float]], max_datasets_per_expert: int | None = None
) -> tuple[float | None, list[int | None]]:
    """Routing accuracy under the best dataset -> expert assignment (order independent).

    Each dataset is assigned one expert and each expert serves at most
    ``m = max_datasets_per_expert`` datasets (default ``ceil(D / E)`` over the ``D`` datasets
    with tokens). With ``D <= E`` that is a one-to-one matching (best permutation); with more
    datasets than experts it is the best many-to-one assignment with balanced sharing. The cap
    matters: without it every dataset would take its argmax expert and a router that sends
    everything to one expert would score 100 %. Solved exactly as a linear assignment
    (Hungarian, ``scipy.optimize.linear_sum_assignment``) against ``m`` copies of every expert.

    Args:
        counts: ``[D, E]`` top-1 counts (or shares).
        max_datasets_per_expert: the cap ``m`` (>= 1); None = ``ceil(D / E)``.

    Returns:
        ``(accuracy, assignment)``: accuracy = mean over datasets with tokens of the share of
        their tokens routed to their assigned expert (a uniform router scores ``1/E``, a
        perfectly specialised one 1.0 in any expert order); assignment = ``D`` expert ids (None
        for a dataset without tokens). Accuracy is None when no dataset has tokens.
    """
    c = _active_rows(counts)
    num_ds, num_experts = c.shape
    has = c.sum(1) > 0
    assignment: list[int | None] = [None] * num_ds
    if not has.any() or num_experts == 0:
        return None, assignment
    share = _shares(c)  # [D', E]
    m = max_datasets_per_expert or math.ceil(share.shape[0] / num_experts)
    if m < 1 or m * num_experts < share.shape[0]:
        raise ValueError(
            f"max_datasets_per_expert={m} cannot place {share.shape[0]} datasets on "
            f"{num_experts} experts"
        )
    slots = np.repeat(share, m, axis=1)  # [D', E*m], column j is a slot of expert j // m
    rows, cols = linear_sum_assignment(slots, maximize=True)
    idx = np.flatnonzero(has)
    for r, col in zip(rows, cols):
        assignment[int(idx[r])] = int(col // m)
    return float(slots[rows, cols].sum() / share.shape[0]), assignment


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def dataset_expert_nmi(counts: np.ndarray | Sequence[Sequence[float]]) -> float | None:
    """Normalized mutual information between the dataset and the top-1 expert.

    The joint distribution weighs every dataset with tokens equally: ``P(d, e) = share[d, e] /
    D'``. ``NMI = I(dataset; expert) / mean(H(dataset), H(expert))`` (the arithmetic-mean
    normalization, scikit-learn's default). 0 when the expert is independent of the dataset
    (including a collapsed router), 1 when the datasets use disjoint experts and every expert
    serves one dataset (a permuted diagonal). With more datasets than experts the maximum is
    ``2 log E / (log D + log E) < 1``.

    Returns:
        NMI in [0, 1]; None without tokens; 0 when both entropies are 0 (one dataset, one
        expert: nothing to tell apart).
    """
    c = _active_rows(counts)
    if not (c.sum(1) > 0).any():
        return None
    share = _shares(c)  # [D', E]
    joint = share / share.shape[0]  # [D', E], sums to 1
    p_d = joint.sum(1)
    p_e = joint.sum(0)
    h_d, h_e = _entropy(p_d), _entropy(p_e)
    if h_d + h_e == 0:
        return 0.0
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(p_d, p_e)[nz])).sum())
    return float(min(max(mi / (0.5 * (h_d + h_e)), 0.0), 1.0))


def routing_entropy(counts: np.ndarray | Sequence[Sequence[float]]) -> list[float | None]:
    """Per dataset, the entropy (nats) of its top-1 expert distribution.

    0 = every token of the dataset goes to one expert; ``log E`` = spread evenly. Not the mean
    router softmax entropy (``RoutingStats.mean_entropy``), which measures per-token confidence.

    Returns:
        ``D`` entropies; None for a dataset without tokens.
    """
    c = _active_rows(counts)
    return [_entropy(row / row.sum()) if row.sum() > 0 else None for row in c]


def active_experts(counts: np.ndarray | Sequence[Sequence[float]], min_share: float = 0.01) -> int:
    """Number of experts receiving at least ``min_share`` of all counted tokens (collapse check).

    The load is token-weighted (the share of all tokens, as ``expert_load`` in the routing
    summary), unlike the per-dataset metrics above.
    """
    c = _active_rows(counts)
    total = c.sum()
    if total <= 0:
        return 0
    return int((c.sum(0) / total >= min_share).sum())


@dataclass(frozen=True)
class OrderFreeRouting:
    """Order-independent routing metrics of one MoE layer (see :func:`order_free_routing`).

    Attributes:
        best_accuracy: :func:`best_assignment` accuracy (None without tokens).
        best_assignment: the assignment achieving it (``D`` expert ids, None without tokens).
        nmi: :func:`dataset_expert_nmi`.
        routing_entropy: ``D`` entropies (nats) of each dataset's top-1 expert distribution.
        mean_routing_entropy: their mean over datasets with tokens.
        expert_load: ``E`` shares of all counted tokens (token-weighted).
        active_experts: experts with at least 1 % of the tokens.
    """

    best_accuracy: float | None
    best_assignment: list[int | None]
    nmi: float | None
    routing_entropy: list[float | None]
    mean_routing_entropy: float | None
    expert_load: list[float]
    active_experts: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def order_free_routing(counts: np.ndarray | Sequence[Sequence[float]]) -> OrderFreeRouting:
    """All order-independent metrics of a ``[D, E]`` top-1 count matrix."""
    c = _active_rows(counts)
    acc, assign = best_assignment(c)
    ent = routing_entropy(c)
    vals = [e for e in ent if e is not None]
    total = c.sum()
    load = c.sum(0) / total if total > 0 else np.zeros(c.shape[1])
    return OrderFreeRouting(
        best_accuracy=acc,
        best_assignment=assign,
        nmi=dataset_expert_nmi(c),
        routing_entropy=ent,
        mean_routing_entropy=float(np.mean(vals)) if vals else None,
        expert_load=[float(v) for v in load],
        active_experts=active_experts(c),
    )


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

    def order_free(self) -> list[OrderFreeRouting]:
        """Per layer, the order-independent metrics of the top-1 counts."""
        return [order_free_routing(self.top1[i].numpy()) for i in range(self.num_layers)]

    def summary(self) -> dict[str, Any]:
        """JSON-able derived numbers (fractions, load, drop rate, entropy, accuracy, and the
        order-independent metrics per layer)."""
        acc = self.accuracy()
        acc_d = self.accuracy_per_dataset()
        return {
            "order_free": [m.to_dict() for m in self.order_free()],
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
