"""Dataset -> expert maps: validation, a tensor view, and an automatic proposal from data.

The official code keys its map by the *position* of a dataset on the command line (spec Q1);
here maps are keyed by dataset *name* and validated against the training datasets and ``E``.
Many datasets may share an expert (the paper's 12 sources on 8 experts).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ExpertMap", "propose_mapping", "validate_expert_map"]

logger = logging.getLogger(__name__)


def validate_expert_map(
    mapping: Mapping[str, int], dataset_names: Sequence[str], num_experts: int
) -> None:
    """Check a name-keyed dataset -> expert map.

    Args:
        mapping: dataset name -> expert id.
        dataset_names: the training datasets (every one must be mapped).
        num_experts: ``E``; ids must be in ``[0, E)``.

    Raises:
        ValueError: naming the unknown dataset, the unmapped dataset, or the bad id.
    """
    known = set(dataset_names)
    for name, expert in mapping.items():
        if name not in known:
            raise ValueError(
                f"expert map: unknown dataset {name!r} (training datasets: {sorted(known)})"
            )
        if isinstance(expert, bool) or not isinstance(expert, int):
            raise ValueError(
                f"expert map: dataset {name!r} maps to {expert!r}; expected an int expert id"
            )
        if not 0 <= expert < num_experts:
            raise ValueError(
                f"expert map: dataset {name!r} maps to expert {expert}; "
                f"expected 0 <= id < num_experts={num_experts}"
            )
    missing = [n for n in dataset_names if n not in mapping]
    if missing:
        raise ValueError(f"expert map: training dataset(s) {missing} have no expert")


@dataclass(frozen=True)
class ExpertMap:
    """A validated dataset -> expert map, ordered like the datasets (dataset index = position).

    Attributes:
        dataset_names: the datasets, in dataset-index order.
        experts: expert id of each dataset, same order.
        num_experts: ``E``.
    """

    dataset_names: tuple[str, ...]
    experts: tuple[int, ...]
    num_experts: int

    @classmethod
    def from_dict(
        cls, mapping: Mapping[str, int], dataset_names: Sequence[str], num_experts: int
    ) -> ExpertMap:
        """Validate ``mapping`` (see :func:`validate_expert_map`) and order it by dataset index."""
        validate_expert_map(mapping, dataset_names, num_experts)
        return cls(tuple(dataset_names), tuple(int(mapping[n]) for n in dataset_names), num_experts)

    def __getitem__(self, dataset_name: str) -> int:
        try:
            return self.experts[self.dataset_names.index(dataset_name)]
        except ValueError:
            raise KeyError(
                f"dataset {dataset_name!r} not in the expert map {list(self.dataset_names)}"
            ) from None

    def expert_of(self, dataset_id: int) -> int:
        """Expert of the dataset with index ``dataset_id``."""
        return self.experts[dataset_id]

    def datasets_of(self, expert: int) -> list[str]:
        """Names of the datasets mapped to ``expert``."""
        return [n for n, e in zip(self.dataset_names, self.experts) if e == expert]

    def as_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """``int64 [D]``: entry ``i`` is the expert of dataset index ``i``.

        ``map.as_tensor()[batch.dataset_ids]`` gives the per-image target of :func:`damex_loss`.
        """
        return torch.tensor(self.experts, dtype=torch.long, device=device)

    def to_dict(self) -> dict[str, int]:
        return dict(zip(self.dataset_names, self.experts))

    def unused_experts(self) -> list[int]:
        return sorted(set(range(self.num_experts)) - set(self.experts))


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
