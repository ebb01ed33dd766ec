"""Dataset -> expert maps: validation, a tensor view, and an automatic proposal from data.

The official code keys its map by the *position* of a dataset on the command line (docs/design.md
Q1);
here maps are keyed by dataset *name*. The user's ``moe.expert_map`` is checked at config load
(``damex.config``, errors naming the file); ``ExpertMap`` is the run's map built from it once.
Many datasets may share an expert (the paper's 12 sources on 8 experts).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["NO_EXPERT", "ExpertMap", "propose_mapping", "validate_expert_map"]

logger = logging.getLogger(__name__)

NO_EXPERT = -1  # a dataset without an expert (evaluated only, or no DAMEX loss)


def _check_expert(name: str, expert: Any, num_experts: int, *, allow_none: bool) -> int:
    if isinstance(expert, bool) or not isinstance(expert, int):
        raise ValueError(
            f"expert map: dataset {name!r} maps to {expert!r}; expected an int expert id"
        )
    low = NO_EXPERT if allow_none else 0
    if not low <= expert < num_experts:
        raise ValueError(
            f"expert map: dataset {name!r} maps to expert {expert}; "
            f"expected {low} <= id < num_experts={num_experts}"
        )
    return expert


@dataclass(frozen=True)
class ExpertMap(Mapping[str, int]):
    """The run's dataset -> expert map, one entry per dataset in dataset-index order.

    Built once per run (``ExpertMap.build``), saved in every checkpoint (``to_dict``) and read
    back from it; the training loss, inference statistics and reports all read this object. As
    a ``Mapping[str, int]`` it reads like the name-keyed dict of the config; a dataset without
    an expert (evaluated only) maps to ``NO_EXPERT`` (-1). Datasets may share an expert.

    Attributes:
        dataset_names: the datasets, in dataset-index order.
        experts: expert id of each dataset (``NO_EXPERT`` = none), same order.
        num_experts: ``E``.
    """

    dataset_names: tuple[str, ...]
    experts: tuple[int, ...]
    num_experts: int

    def __post_init__(self) -> None:
        if len(self.dataset_names) != len(self.experts):
            raise ValueError(
                f"expert map: {len(self.dataset_names)} datasets but {len(self.experts)} experts"
            )
        if len(set(self.dataset_names)) != len(self.dataset_names):
            raise ValueError(f"expert map: duplicate dataset names in {list(self.dataset_names)}")
        for name, expert in zip(self.dataset_names, self.experts):
            _check_expert(name, expert, self.num_experts, allow_none=True)

    @classmethod
    def build(
        cls,
        dataset_names: Sequence[str],
        mapping: Mapping[str, int],
        num_experts: int,
        *,
        defaults: Mapping[str, int | None] | None = None,
        required: Sequence[str] = (),
    ) -> ExpertMap:
        """The map of a run: ``mapping`` first, then ``defaults`` (catalog entries), else none.

        Args:
            dataset_names: the run's datasets in dataset-index order.
            mapping: dataset name -> expert id (``moe.expert_map``); names must be datasets of
                the run.
            num_experts: ``E``.
            defaults: dataset name -> default expert (``data.datasets.NAME.expert``) or None.
            required: datasets that must have an expert (the DAMEX loss's training datasets).

        Raises:
            ValueError: naming the unknown or unmapped dataset or the bad id (including
                ``moe.expert_map: auto`` that was not resolved to a mapping first).
        """
        if not isinstance(mapping, Mapping):
            raise ValueError(
                f"expert map: expected a mapping dataset -> expert id, got {mapping!r} "
                "('auto' must be resolved to a mapping before the run's map is built)"
            )
        names = list(dataset_names)
        unknown = [n for n in mapping if n not in names]
        if unknown:
            raise ValueError(f"expert map: unknown dataset(s) {unknown} (datasets: {names})")
        experts = []
        for name in names:
            expert = mapping.get(name, (defaults or {}).get(name))
            if expert is None:
                experts.append(NO_EXPERT)
            else:
                experts.append(_check_expert(name, expert, num_experts, allow_none=False))
        missing = [n for n, e in zip(names, experts) if e == NO_EXPERT and n in required]
        if missing:
            raise ValueError(f"expert map: dataset(s) {missing} have no expert")
        return cls(tuple(names), tuple(experts), num_experts)

    @classmethod
    def from_dict(
        cls, mapping: Mapping[str, int], dataset_names: Sequence[str], num_experts: int
    ) -> ExpertMap:
        """A map in which every dataset of ``dataset_names`` has an expert (see ``build``)."""
        return cls.build(dataset_names, mapping, num_experts, required=dataset_names)

    def __getitem__(self, dataset_name: str) -> int:
        try:
            return self.experts[self.dataset_names.index(dataset_name)]
        except ValueError:
            raise KeyError(
                f"dataset {dataset_name!r} not in the expert map {list(self.dataset_names)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.dataset_names)

    def __len__(self) -> int:
        return len(self.dataset_names)

    def expert_of(self, dataset_id: int) -> int:
        """Expert of the dataset with index ``dataset_id`` (``NO_EXPERT`` if none)."""
        return self.experts[dataset_id]

    def datasets_of(self, expert: int) -> list[str]:
        """Names of the datasets mapped to ``expert``."""
        return [n for n, e in zip(self.dataset_names, self.experts) if e == expert]

    def as_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """``int64 [D]``: entry ``i`` is the expert of dataset index ``i`` (-1: none).

        ``map.as_tensor()[batch.dataset_ids]`` gives the per-image target of :func:`damex_loss`.
        """
        return torch.tensor(self.experts, dtype=torch.long, device=device)

    def to_dict(self) -> dict[str, int]:
        """``{name: expert}`` for the datasets that have one (JSON-able; saved in checkpoints)."""
        return {n: e for n, e in zip(self.dataset_names, self.experts) if e != NO_EXPERT}

    def unused_experts(self) -> list[int]:
        return sorted(set(range(self.num_experts)) - set(self.experts))


def validate_expert_map(
    mapping: Mapping[str, int], dataset_names: Sequence[str], num_experts: int
) -> None:
    """Check that ``mapping`` maps every one of ``dataset_names`` (and nothing else) into [0, E).

    Raises:
        ValueError: naming the unknown dataset, the unmapped dataset, or the bad id.
    """
    ExpertMap.from_dict(mapping, dataset_names, num_experts)


def _kmeans_pp_init(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    centers = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centers)).min(1).values.pow(2)
        if float(d2.sum()) <= 0:
            probs = torch.ones(len(x), dtype=x.dtype)
        else:
            probs = d2
        centers.append(x[torch.multinomial(probs, 1, generator=gen)].squeeze(0))
    return torch.stack(centers)


def _lloyd(x: Tensor, labels: Tensor, k: int, iters: int = 100) -> tuple[Tensor, float]:
    """Lloyd iterations from an assignment, never leaving a cluster empty."""
    for _ in range(iters):
        centers = torch.stack([x[labels == c].mean(0) for c in range(k)])
        new = torch.cdist(x, centers).argmin(1)
        for c in range(k):  # refill an emptied cluster with the point farthest from its center
            if not bool((new == c).any()):
                dist = (x - centers[new]).pow(2).sum(1)
                counts = torch.bincount(new, minlength=k)
                dist[counts[new] <= 1] = -1.0  # do not empty another cluster
                new[int(dist.argmax())] = c
        if torch.equal(new, labels):
            break
        labels = new
    centers = torch.stack([x[labels == c].mean(0) for c in range(k)])
    inertia = float((x - centers[labels]).pow(2).sum())
    return labels, inertia


def _ward(x: Tensor, k: int) -> Tensor:
    """Agglomerative clustering with Ward's criterion down to ``k`` clusters (deterministic)."""
    clusters: list[list[int]] = [[i] for i in range(len(x))]
    while len(clusters) > k:
        best, pair = None, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                na, nb = len(clusters[a]), len(clusters[b])
                diff = x[clusters[a]].mean(0) - x[clusters[b]].mean(0)
                cost = float(na * nb / (na + nb) * diff.pow(2).sum())
                if best is None or cost < best:
                    best, pair = cost, (a, b)
        a, b = pair
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    labels = torch.empty(len(x), dtype=torch.long)
    for c, members in enumerate(clusters):
        labels[members] = c
    return labels


def propose_mapping(
    dataset_features: Mapping[str, Tensor],
    num_experts: int,
    seed: int = 0,
    num_restarts: int = 10,
) -> dict[str, int]:
    """Propose a dataset -> expert map by clustering per-dataset descriptors.

    Each dataset is summarized by the mean of its feature rows (e.g. mean-pooled backbone
    features of some images, or mean router logits of a dense/vanilla-MoE model). The
    descriptors are grouped by Euclidean distance into ``min(D, E)`` clusters: Ward
    agglomerative clustering plus ``num_restarts`` seeded k-means++ runs, keeping the solution
    with the lowest within-cluster sum of squares. No cluster is empty, so every expert is used
    when ``D >= E``; with ``D < E`` each dataset gets its own expert and ``E - D`` stay unused.
    Expert ids are numbered by first appearance in ``dataset_features``' order.

    Args:
        dataset_features: dataset name -> ``[N_d, F]`` features (``N_d >= 1``).
        num_experts: ``E``.
        seed: seeds the k-means++ restarts (the result is deterministic for a seed).
        num_restarts: k-means++ restarts besides the Ward solution.

    Returns:
        dataset name -> expert id (passes :func:`validate_expert_map`).
    """
    names = list(dataset_features)
    if not names:
        raise ValueError("propose_mapping: no datasets given")
    if num_experts < 1:
        raise ValueError(f"propose_mapping: num_experts must be >= 1, got {num_experts}")
    rows = []
    for name in names:
        feats = dataset_features[name]
        if feats.dim() != 2 or feats.shape[0] == 0:
            raise ValueError(
                f"propose_mapping: features of {name!r} must be [N >= 1, F], "
                f"got {tuple(feats.shape)}"
            )
        rows.append(feats.detach().double().mean(0).cpu())
    if len({r.shape[0] for r in rows}) != 1:
        widths = {n: r.shape[0] for n, r in zip(names, rows)}
        raise ValueError(f"propose_mapping: feature widths differ: {widths}")
    desc = torch.stack(rows)  # [D, F]
    desc = desc - desc.mean(0, keepdim=True)
    k = min(len(names), num_experts)
    if k < num_experts:
        logger.warning(
            "propose_mapping: %d datasets for %d experts; %d experts stay unused",
            len(names),
            num_experts,
            num_experts - k,
        )
    if k == len(names):
        labels = torch.arange(k)
    else:
        labels, best = _lloyd(desc, _ward(desc, k), k)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(num_restarts):
            init = torch.cdist(desc, _kmeans_pp_init(desc, k, gen)).argmin(1)
            # Seed empty clusters so that Lloyd starts from k non-empty groups.
            for c in range(k):
                if not bool((init == c).any()):
                    counts = torch.bincount(init, minlength=k)
                    donor = int(torch.nonzero(counts[init] > 1)[0])
                    init[donor] = c
            cand, inertia = _lloyd(desc, init, k)
            if inertia < best - 1e-12:
                labels, best = cand, inertia
    relabel: dict[int, int] = {}
    mapping = {}
    for name, lab in zip(names, labels.tolist()):
        relabel.setdefault(lab, len(relabel))
        mapping[name] = relabel[lab]
    logger.info("propose_mapping: %s", mapping)
    return mapping
