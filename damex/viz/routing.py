"""Routing figures: datasets x experts heatmaps, routing accuracy, boxes coloured by expert.

The heatmap is the likely DAMEX routing plot (docs/design.md §6 item 5): for each MoE layer, the
share of
each test dataset's tokens whose top-1 expert is ``e``. Vanilla MoE should look uniform (or
collapsed onto a few experts); DAMEX near-diagonal, following the dataset -> expert map, which
is outlined on the mapped cells.

Figures are built on ``matplotlib.figure.Figure`` directly (the Agg canvas; no pyplot global
state, no GUI backend), so they are safe in worker processes and tests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from damex.modeling.outputs import TokenKind
from damex.moe.types import RoutingInfo
from damex.structures import Detections
from damex.viz.boxes import Color, draw_boxes, legend_strip, palette

__all__ = [
    "expert_colors",
    "plot_routing_heatmap",
    "plot_routing_accuracy",
    "save_figure",
    "save_routing_figures",
    "draw_expert_overlay",
    "query_experts",
]


def expert_colors(num_experts: int) -> list[Color]:
    """The colour of every expert (shared by overlays and legends)."""
    return palette(num_experts)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_routing_heatmap(
    share: np.ndarray | Sequence[Sequence[float]],
    *,
    dataset_names: Sequence[str],
    expert_map: Mapping[str, int] | None = None,
    title: str = "",
    annotate: bool = True,
) -> Figure:
    """A datasets x experts heatmap of routing shares with the configured map outlined.

    Args:
        share: ``[D, E]`` share of each dataset's tokens whose top-1 expert is ``e`` (rows sum
            to 1; a dataset without tokens is a row of zeros).
        dataset_names: ``D`` row labels.
        expert_map: dataset name -> expert; the mapped cells get a red outline.
        title: figure title.
        annotate: write each cell's value.

    Returns:
        The figure (save with :func:`save_figure`).
    """
    mat = np.asarray(share, dtype=np.float64)  # [D, E]
    if mat.ndim != 2 or mat.shape[0] != len(dataset_names):
        raise ValueError(f"share must be [D={len(dataset_names)}, E], got {tuple(mat.shape)}")
    num_ds, num_experts = mat.shape
    fig = _new_figure(
        1.8 + 0.55 * num_experts + 0.08 * max(map(len, dataset_names), default=0),
        1.2 + 0.42 * num_ds,
    )
    ax = fig.add_subplot()
    im = ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(num_experts), [f"E{e}" for e in range(num_experts)])
    ax.set_yticks(range(num_ds), list(dataset_names))
    ax.set_xlabel("expert (top-1)")
    ax.set_ylabel("dataset")
    if title:
        ax.set_title(title, fontsize=10)
    if annotate:
        size = 8 if num_experts <= 8 else 6
        for d in range(num_ds):
            for e in range(num_experts):
                v = mat[d, e]
                ax.text(
                    e,
                    d,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="black" if v > 0.6 else "white",
                )
    for d, name in enumerate(dataset_names):
        e = (expert_map or {}).get(name)
        if e is not None and 0 <= e < num_experts:
            ax.add_patch(
                Rectangle((e - 0.5, d - 0.5), 1.0, 1.0, fill=False, edgecolor="red", linewidth=2.5)
            )
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label="share of tokens")
    return fig


def plot_routing_accuracy(
    accuracy: np.ndarray | Sequence[Sequence[float | None]],
    *,
    dataset_names: Sequence[str],
    layer_names: Sequence[str],
    num_experts: int | None = None,
    title: str = "Routing accuracy: share of tokens whose top-1 expert is the mapped one",
) -> Figure:
    """Grouped bars: for every dataset, one bar per MoE layer.

    Args:
        accuracy: ``[L, D]`` share of each dataset's tokens routed to its mapped expert; None or
            NaN where undefined (no map entry or no token): no bar.
        dataset_names: ``D`` group labels.
        layer_names: ``L`` legend entries.
        num_experts: draws the chance level ``1 / E`` when given.
        title: axes title.
    """
    acc = np.array(
        [[np.nan if v is None else float(v) for v in row] for row in accuracy], dtype=np.float64
    ).reshape(len(layer_names), len(dataset_names))  # [L, D]
    num_layers, num_ds = acc.shape
    fig = _new_figure(2.0 + 0.35 * num_ds * max(num_layers, 1) ** 0.5 + 0.3 * num_ds, 3.2)
    ax = fig.add_subplot()
    width = 0.8 / max(num_layers, 1)
    colors = palette(num_layers)
    x = np.arange(num_ds)
    for li in range(num_layers):
        vals = acc[li]
        ok = ~np.isnan(vals)
        ax.bar(
            x[ok] - 0.4 + width * (li + 0.5),
            vals[ok],
            width=width,
            color=np.array(colors[li]) / 255.0,
            label=layer_names[li],
        )
    if num_experts:
        ax.axhline(
            1.0 / num_experts,
            color="gray",
            linestyle="--",
            linewidth=1,
            label=f"chance 1/{num_experts}",
        )
    ax.set_xticks(
        x,
        list(dataset_names),
        rotation=30 if num_ds > 4 else 0,
        ha="right" if num_ds > 4 else "center",
    )
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Save a figure as PNG (parent folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def save_routing_figures(
    summary: Mapping[str, Any], out_dir: str | os.PathLike[str]
) -> dict[str, list[Path]]:
    """Write every figure of a routing summary (``damex.evaluation.routing.routing_summary``).

    Args:
        summary: the JSON-able routing summary (``datasets``, ``num_experts``, ``expert_map``,
            ``layers`` with ``name``, ``share`` and ``accuracy``).
        out_dir: output folder.

    Returns:
        ``{"heatmaps": [one PNG per layer], "accuracy": [the bar chart, if a map is given]}``.
    """
    out = Path(out_dir)
    names = list(summary["datasets"])
    expert_map = dict(summary.get("expert_map") or {})
    heatmaps: list[Path] = []
    for i, layer in enumerate(summary["layers"]):
        acc = layer.get("mean_accuracy")
        suffix = f" - accuracy {100 * acc:.1f}%" if acc is not None else ""
        fig = plot_routing_heatmap(
            layer["share"],
            dataset_names=names,
            expert_map=expert_map,
            title=f"{layer['name']}: top-1 routing share{suffix}",
        )
        heatmaps.append(
            save_figure(fig, out / f"routing_heatmap_{i:02d}_{_safe(layer['name'])}.png")
        )
    result: dict[str, list[Path]] = {"heatmaps": heatmaps, "accuracy": []}
    accuracy = [layer.get("accuracy") for layer in summary["layers"]]
    if expert_map and accuracy and all(a is not None for a in accuracy):
        fig = plot_routing_accuracy(
            accuracy,
            dataset_names=names,
            layer_names=[layer["name"] for layer in summary["layers"]],
            num_experts=int(summary.get("num_experts") or 0) or None,
        )
        result["accuracy"].append(save_figure(fig, out / "routing_accuracy.png"))
    return result


def query_experts(info: RoutingInfo, *, image_index: int, num_queries: int) -> np.ndarray:
    """Top-1 expert of every matching query of one image, for :func:`draw_expert_overlay`.

    Args:
        info: one MoE layer's routing of a batch (with ``token_query`` set by the detector).
        image_index: the image's index in the batch.
        num_queries: ``Q`` matching queries per image.

    Returns:
        ``int64`` ``[Q]``; ``-1`` for a query the layer holds no token of.
    """
    if info.token_query is None:
        raise ValueError("RoutingInfo.token_query is None: the detector must tag its tokens")
    sel = info.token_image == image_index  # [T]
    if info.token_kind is not None:
        sel &= info.token_kind == int(TokenKind.MATCHING)
    sel &= (info.token_query >= 0) & (info.token_query < num_queries)
    out = torch.full((num_queries,), -1, dtype=torch.long)
    out[info.token_query[sel].cpu().long()] = info.expert[sel, 0].cpu().long()
    return out.numpy()


def draw_expert_overlay(
    image: Tensor | np.ndarray,
    detections: Detections,
    query_expert: Tensor | np.ndarray | Sequence[int],
    *,
    num_experts: int,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.15,
    legend: bool = True,
    width: int = 2,
    font_size: int = 12,
) -> np.ndarray:
    """Draw detections coloured by the expert their query was routed to.

    Args:
        image: RGB ``[3, H, W]`` or ``[H, W, 3]`` in the pixels of ``detections.boxes``.
        detections: with ``query_index`` ``[N]`` (the matching query of every box).
        query_expert: ``[Q]`` top-1 expert of every matching query of this image (one MoE
            layer); ``-1`` for a query without one (drawn grey).
        num_experts: ``E`` (fixes the colours, so every image uses the same legend).
        class_names: name of every unified label; None prints the index.
        score_threshold: minimum score drawn.
        legend: append a strip below the image with one colour swatch per expert.
        width: line width in pixels.
        font_size: label font size in pixels.

    Returns:
        ``uint8`` ``[H (+ legend), W, 3]``.
    """
    experts = torch.as_tensor(np.asarray(query_expert), dtype=torch.long).reshape(-1)  # [Q]
    n = len(detections)
    if detections.query_index.numel() != n:
        raise ValueError(
            f"detections.query_index must have one entry per box ({n}), got "
            f"{detections.query_index.numel()}: the postprocess must fill it"
        )
    qi = detections.query_index.cpu().long()  # [N]
    if n and (int(qi.min()) < 0 or int(qi.max()) >= experts.numel()):
        raise ValueError(
            f"query_index must be in [0, {experts.numel()}) (the query_expert length), got "
            f"[{int(qi.min())}, {int(qi.max())}]"
        )
    box_expert = experts[qi].tolist() if n else []  # [N]
    colors_e = expert_colors(num_experts)
    keep = (detections.scores.cpu() >= score_threshold).nonzero().flatten()  # [n]
    labels = detections.labels.cpu().tolist()
    scores = detections.scores.cpu().tolist()
    colors, texts = [], []
    for i in keep.tolist():
        e = box_expert[i]
        colors.append(colors_e[e] if 0 <= e < num_experts else (128, 128, 128))
        name = class_names[labels[i]] if class_names is not None else str(labels[i])
        texts.append(f"E{e} {name} {scores[i]:.2f}" if e >= 0 else f"{name} {scores[i]:.2f}")
    canvas = draw_boxes(
        image,
        detections.boxes.cpu()[keep],
        colors=colors,
        texts=texts,
        width=width,
        font_size=font_size,
    )
    if legend:
        entries = [(f"E{e}", c) for e, c in enumerate(colors_e)]
        canvas = np.concatenate((canvas, legend_strip(canvas.shape[1], entries, font_size)), 0)
    return canvas
