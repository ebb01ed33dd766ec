"""Routing statistics as tables: datasets x experts shares per MoE layer, routing accuracy.

Input: the top-1 routing counts accumulated over a test run (``damex.moe.stats.RoutingStats``,
one ``[D, E]`` count matrix per MoE layer, plus dropped tokens and the summed router entropy),
the dataset names and the configured dataset -> expert map. Output: a JSON-able summary dict
(the input of ``damex.viz.routing.save_routing_figures`` and ``damex.viz.report``) and markdown
tables.

Definitions (per layer, per dataset ``d`` with ``n_d`` counted tokens):

- share ``[d, e]`` = tokens of ``d`` whose top-1 expert is ``e`` / ``n_d`` (rows sum to 1; a
  dataset without tokens is a row of zeros);
- accuracy ``[d]`` = share ``[d, map[d]]``: the DAMEX objective (docs/design.md §3) measured at
  test time,
  where the router never sees the dataset identity; undefined (None) without a map entry;
- drop rate ``[d]`` = routing assignments of ``d``'s tokens dropped by the capacity limit /
  all of them (``k`` per token; for top-1, the share of tokens dropped);
- entropy ``[d]`` = mean over ``d``'s tokens of the router's softmax entropy (nats; the maximum
  is ``log E``);
- expert load ``[e]`` = share of all tokens whose top-1 expert is ``e`` (top-1 only, like the
  share matrix; ``RoutingStats.expert_load`` counts all ``k`` choices).

Order-independent metrics (``damex.moe.stats``), for every MoE model, DAMEX and vanilla alike:
a vanilla router never sees the configured map, so its ``accuracy`` says nothing about
specialisation; these do not change when the experts are renumbered:

- best accuracy = the accuracy under the best dataset -> expert assignment, each expert serving
  at most ``ceil(D/E)`` datasets (a one-to-one Hungarian matching when ``D <= E``); a uniform
  router scores ``1/E``, a perfectly specialised one 100 % in any expert order;
- NMI = normalized mutual information between dataset and top-1 expert (0 = independent,
  1 = each expert serves exactly one dataset);
- routing entropy ``[d]`` = entropy (nats) of dataset ``d``'s top-1 expert distribution (0 = one
  expert, ``log E`` = spread evenly);
- active experts = experts receiving at least 1 % of all tokens (fewer = collapse).

Layer means over datasets are unweighted (each dataset counts once, as in the AP mean).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from damex.moe.stats import RoutingStats, order_free_routing

__all__ = [
    "LayerRouting",
    "share_matrix",
    "routing_accuracy",
    "summarize_layers",
    "routing_summary",
    "routing_markdown",
]


@dataclass(frozen=True)
class LayerRouting:
    """Accumulated routing counts of one MoE layer.

    Attributes:
        name: layer name (e.g. ``"decoder.3"``).
        counts: ``[D, E]`` tokens of each dataset whose top-1 expert is ``e``.
        dropped: ``[D]`` routing assignments dropped by the capacity limit, or None.
        entropy_sum: ``[D]`` sum over tokens of the router softmax entropy (nats), or None.
        assigned: ``[D]`` routing assignments (``k`` per token); None means ``k = 1`` (the
            token count).
    """

    name: str
    counts: np.ndarray
    dropped: np.ndarray | None = None
    entropy_sum: np.ndarray | None = None
    assigned: np.ndarray | None = None


def share_matrix(counts: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Row-normalized routing counts.

    Args:
        counts: ``[D, E]`` non-negative counts.

    Returns:
        ``[D, E]`` float64; each row sums to 1, or is all zeros when the dataset has no token.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"counts must be [D, E], got shape {tuple(c.shape)}")
    if (c < 0).any():
        raise ValueError("counts must be non-negative")
    tokens = c.sum(axis=1, keepdims=True)  # [D, 1]
    return np.divide(c, tokens, out=np.zeros_like(c), where=tokens > 0)


def routing_accuracy(
    counts: np.ndarray | Sequence[Sequence[float]], mapped_expert: Sequence[int | None]
) -> list[float | None]:
    """Share of each dataset's tokens whose top-1 expert is its mapped expert.

    Args:
        counts: ``[D, E]`` top-1 counts.
        mapped_expert: ``D`` mapped expert per dataset (None or -1: no map entry).

    Returns:
        ``D`` accuracies; None where there is no map entry or no token.
    """
    c = np.asarray(counts, dtype=np.float64)
    if len(mapped_expert) != c.shape[0]:
        raise ValueError(
            f"mapped_expert has {len(mapped_expert)} entries, counts {c.shape[0]} rows"
        )
    out: list[float | None] = []
    for d, e in enumerate(mapped_expert):
        n = c[d].sum()
        if e is None or e < 0 or n == 0:
            out.append(None)
        elif e >= c.shape[1]:
            raise ValueError(f"mapped expert {e} of row {d} >= number of experts {c.shape[1]}")
        else:
            out.append(float(c[d, e] / n))
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else None


def _per_dataset(
    num: np.ndarray | None, tokens: np.ndarray, name: str, num_ds: int
) -> list[float | None] | None:
    if num is None:
        return None
    arr = np.asarray(num, dtype=np.float64).reshape(-1)
    if arr.shape[0] != num_ds:
        raise ValueError(f"{name} must have D={num_ds} entries, got {arr.shape[0]}")
    return [float(a / t) if t > 0 else None for a, t in zip(arr, tokens)]


def summarize_layers(
    layers: Sequence[LayerRouting],
    *,
    dataset_names: Sequence[str],
    expert_map: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The JSON-able routing summary of several MoE layers.

    Args:
        layers: one :class:`LayerRouting` per MoE layer, all ``[D, E]``.
        dataset_names: ``D`` row names.
        expert_map: dataset name -> expert (datasets not named have no accuracy).

    Returns:
        ``{"datasets", "num_experts", "expert_map", "layers": [{"name", "tokens" [D],
        "counts" [D][E], "share" [D][E], "accuracy" [D] | None, "mean_accuracy",
        "drop_rate" [D] | None, "mean_drop_rate", "entropy" [D] | None, "mean_entropy",
        "expert_load" [E], "best_accuracy", "best_assignment" [D], "nmi", "routing_entropy" [D],
        "mean_routing_entropy", "active_experts"}], "mean_accuracy", "mean_best_accuracy",
        "mean_nmi", "max_entropy"}``; undefined values are None.
    """
    num_ds = len(dataset_names)
    if not layers:
        raise ValueError("no MoE layer to summarize")
    num_experts = int(np.asarray(layers[0].counts).shape[1])
    emap = {str(k): int(v) for k, v in (expert_map or {}).items()}
    bad = {k: v for k, v in emap.items() if not 0 <= v < num_experts}
    if bad:
        raise ValueError(f"expert_map entries {bad} outside [0, {num_experts})")
    mapped = [emap.get(n) for n in dataset_names]
    out_layers = []
    for layer in layers:
        counts = np.asarray(layer.counts, dtype=np.float64)
        if counts.shape != (num_ds, num_experts):
            raise ValueError(
                f"layer {layer.name}: counts must be [D={num_ds}, E={num_experts}], got "
                f"{tuple(counts.shape)}"
            )
        tokens = counts.sum(axis=1)  # [D]
        total = tokens.sum()
        acc = routing_accuracy(counts, mapped) if emap else None
        assigned = tokens if layer.assigned is None else np.asarray(layer.assigned, np.float64)
        drop = _per_dataset(layer.dropped, assigned.reshape(-1), "dropped", num_ds)
        ent = _per_dataset(layer.entropy_sum, tokens, "entropy_sum", num_ds)
        free = order_free_routing(counts)
        out_layers.append(
            {
                "name": layer.name,
                "tokens": [int(t) for t in tokens],
                "counts": [[int(v) for v in row] for row in counts],
                "share": share_matrix(counts).tolist(),
                "accuracy": acc,
                "mean_accuracy": _mean(acc) if acc is not None else None,
                "drop_rate": drop,
                "mean_drop_rate": _mean(drop) if drop is not None else None,
                "entropy": ent,
                "mean_entropy": _mean(ent) if ent is not None else None,
                "expert_load": (counts.sum(0) / total if total > 0 else counts.sum(0)).tolist(),
                "best_accuracy": free.best_accuracy,
                "best_assignment": free.best_assignment,
                "nmi": free.nmi,
                "routing_entropy": free.routing_entropy,
                "mean_routing_entropy": free.mean_routing_entropy,
                "active_experts": free.active_experts,
            }
        )
    return {
        "datasets": list(dataset_names),
        "num_experts": num_experts,
        "expert_map": {n: emap[n] for n in dataset_names if n in emap},
        "layers": out_layers,
        "mean_accuracy": _mean([layer["mean_accuracy"] for layer in out_layers]),
        "mean_best_accuracy": _mean([layer["best_accuracy"] for layer in out_layers]),
        "mean_nmi": _mean([layer["nmi"] for layer in out_layers]),
        "max_entropy": math.log(num_experts),
    }


def routing_summary(
    stats: RoutingStats | Mapping[str, Any],
    *,
    dataset_names: Sequence[str],
    expert_map: Mapping[str, int] | None = None,
    layer_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The routing summary of accumulated ``RoutingStats`` (see :func:`summarize_layers`).

    Args:
        stats: the counters (or their ``to_dict()``), already merged / all-reduced.
        dataset_names: ``D`` names in the stats' dataset index order.
        expert_map: dataset name -> expert; default: the stats' own index map, if any.
        layer_names: ``L`` names; default ``moe.0``, ``moe.1``, ...

    Returns:
        The JSON-able summary, plus ``"raw"``: ``stats.to_dict()`` (exact counters).
    """
    if not isinstance(stats, RoutingStats):
        stats = RoutingStats.from_dict(dict(stats))
    if len(dataset_names) != stats.num_datasets:
        raise ValueError(
            f"got {len(dataset_names)} dataset names for {stats.num_datasets} datasets in the stats"
        )
    names = list(layer_names) if layer_names is not None else None
    if names is None:
        names = [f"moe.{i}" for i in range(stats.num_layers)]
    if len(names) != stats.num_layers:
        raise ValueError(f"got {len(names)} layer names for {stats.num_layers} MoE layers")
    if expert_map is None and stats.expert_map is not None:
        expert_map = {n: int(e) for n, e in zip(dataset_names, stats.expert_map.tolist())}
    layers = [
        LayerRouting(
            name=names[i],
            counts=stats.top1[i].numpy(),
            dropped=stats.dropped[i].sum(-1).numpy(),
            entropy_sum=stats.entropy_sum[i].numpy(),
            assigned=stats.assigned[i].sum(-1).numpy(),
        )
        for i in range(stats.num_layers)
    ]
    out = summarize_layers(layers, dataset_names=dataset_names, expert_map=expert_map)
    out["raw"] = stats.to_dict()
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100.0 * v:.1f}"


def routing_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown tables of a routing summary.

    One overview table (layers x mean accuracy / drop rate / entropy), then per layer a
    datasets x experts share table (percent, the mapped cell in bold) with the dataset's
    accuracy, drop rate and entropy.
    """
    names = list(summary["datasets"])
    emap = dict(summary.get("expert_map") or {})
    num_experts = int(summary["num_experts"])
    lines = [
        "| layer | map accuracy % | best-assignment accuracy % | NMI | routing entropy (nats) "
        "| active experts | mean drop % | mean router entropy (nats) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in summary["layers"]:
        ent = layer.get("mean_entropy")
        nmi = layer.get("nmi")
        rent = layer.get("mean_routing_entropy")
        active = layer.get("active_experts")
        lines.append(
            f"| {layer['name']} | {_pct(layer.get('mean_accuracy'))} | "
            f"{_pct(layer.get('best_accuracy'))} | {'-' if nmi is None else f'{nmi:.3f}'} | "
            f"{'-' if rent is None else f'{rent:.3f}'} | "
            f"{'-' if active is None else f'{active}/{num_experts}'} | "
            f"{_pct(layer.get('mean_drop_rate'))} | {'-' if ent is None else f'{ent:.3f}'} |"
        )
    lines.append(
        "\nmap accuracy: tokens routed to the configured expert of their dataset (meaningful for "
        "DAMEX only); best-assignment accuracy, NMI, routing entropy and active experts (>= 1 % "
        "of tokens) do not depend on the experts' order."
    )
    lines.append(f"\nmax entropy log E = {math.log(num_experts):.3f} nats\n")
    experts = [f"E{e}" for e in range(num_experts)]
    for layer in summary["layers"]:
        lines.append(f"### {layer['name']}: top-1 share of each dataset's tokens (%)\n")
        lines.append(
            "| dataset | " + " | ".join(experts) + " | tokens | accuracy % | drop % | entropy |"
        )
        lines.append("|---|" + "---|" * (num_experts + 4))
        acc, drop, ent = layer.get("accuracy"), layer.get("drop_rate"), layer.get("entropy")
        for d, name in enumerate(names):
            cells = []
            for e, v in enumerate(layer["share"][d]):
                cell = f"{100.0 * v:.1f}"
                cells.append(f"**{cell}**" if emap.get(name) == e else cell)
            e_d = ent[d] if ent is not None else None
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | {layer['tokens'][d]} | "
                f"{_pct(acc[d] if acc is not None else None)} | "
                f"{_pct(drop[d] if drop is not None else None)} | "
                f"{'-' if e_d is None else f'{e_d:.3f}'} |"
            )
        load = " | ".join(f"{100.0 * v:.1f}" for v in layer["expert_load"])
        lines.append(f"| *all (load)* | {load} | {sum(layer['tokens'])} | | | |")
        lines.append("")
    return "\n".join(lines)
