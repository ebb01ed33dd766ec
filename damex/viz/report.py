"""A self-contained HTML routing report (figures embedded as base64 PNG data URIs)."""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from damex.evaluation.coco_eval import EvalResults

__all__ = ["write_routing_report", "png_data_uri"]

logger = logging.getLogger(__name__)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: bold; border-top: 2px solid #555; }
td.mapped { background: #ffe2e2; font-weight: bold; }
figure { display: inline-block; margin: 0.4em; vertical-align: top; }
figcaption { font-size: 0.8em; color: #555; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { font-size: 0.85em; color: #555; }
"""


def png_data_uri(path: str | os.PathLike[str]) -> str:
    """``data:image/png;base64,...`` of a PNG file.

    Raises:
        ValueError: the file is not a PNG.
    """
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"{os.fspath(path)} is not a PNG file (bad signature)")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _e(v: Any) -> str:
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], mean_last: bool = False) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = ' class="mean"' if mean_last and i == len(rows) - 1 else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:.1f}"


def _eval_section(eval_results: EvalResults | Mapping[str, Any]) -> str:
    res = (
        eval_results
        if isinstance(eval_results, EvalResults)
        else EvalResults.from_dict(eval_results)
    )
    header, rows = res.table_rows()
    parts = [
        "<h2>Detection: COCO AP per dataset (percent)</h2>",
        _table(header, rows, mean_last=True),
        '<p class="note">AP = AP@[.5:.95]; unrestricted top-K, each dataset evaluated on its '
        "own categories; foreign % = share of detections whose label belongs to another "
        "dataset (ignored by COCOeval). '-' = undefined.</p>",
    ]
    if res.oracle is not None:
        parts.append(
            '<p class="note">oracle = scores restricted to the dataset\'s labels before top-K '
            "(uses the dataset identity; reported separately, not the protocol).</p>"
        )
    for name, reason in res.skipped.items():
        parts.append(f'<p class="note">skipped {_e(name)}: {_e(reason)}</p>')
    return "\n".join(parts)


def _routing_section(summary: Mapping[str, Any]) -> str:
    names = list(summary["datasets"])
    emap = dict(summary.get("expert_map") or {})
    num_experts = int(summary["num_experts"])
    parts = ["<h2>Routing</h2>"]
    if emap:
        parts.append(
            '<p class="note">dataset &rarr; expert map: '
            + ", ".join(f"{_e(k)} &rarr; E{v}" for k, v in emap.items())
            + "</p>"
        )
    overview = []
    for layer in summary["layers"]:
        ent = layer.get("mean_entropy")
        nmi = layer.get("nmi")
        overview.append(
            [
                layer["name"],
                _pct(layer.get("mean_accuracy")),
                _pct(layer.get("best_accuracy")),
                "-" if nmi is None else f"{nmi:.3f}",
                f"{layer.get('active_experts', '-')}/{num_experts}",
                _pct(layer.get("mean_drop_rate")),
                "-" if ent is None else f"{ent:.3f}",
                str(sum(layer["tokens"])),
            ]
        )
    parts.append(
        _table(
            [
                "layer",
                "map accuracy %",
                "best-assignment accuracy %",
                "NMI",
                "active experts",
                "mean drop %",
                "mean entropy (nats)",
                "tokens",
            ],
            overview,
        )
    )
    parts.append(
        f'<p class="note">accuracy = share of a dataset\'s tokens whose top-1 expert is its '
        f"mapped expert; best-assignment accuracy (each expert serving at most ceil(D/E) "
        f"datasets), NMI (dataset vs expert) and active experts (>= 1 % of the tokens) do not "
        f"depend on the experts' order; entropy max = log E = {math.log(num_experts):.3f} "
        f"nats.</p>"
    )
    header = ["dataset"] + [f"E{e}" for e in range(num_experts)]
    header += ["tokens", "accuracy %", "drop %", "entropy"]
    for layer in summary["layers"]:
        parts.append(f"<h3>{_e(layer['name'])}: top-1 share of each dataset's tokens (%)</h3>")
        acc, drop, ent = layer.get("accuracy"), layer.get("drop_rate"), layer.get("entropy")
        rows = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
        for d, name in enumerate(names):
            cells = [f"<td>{_e(name)}</td>"]
            for e, v in enumerate(layer["share"][d]):
                cls = ' class="mapped"' if emap.get(name) == e else ""
                cells.append(f"<td{cls}>{100.0 * v:.1f}</td>")
            e_d = ent[d] if ent is not None else None
            cells += [
                f"<td>{layer['tokens'][d]}</td>",
                f"<td>{_pct(acc[d] if acc is not None else None)}</td>",
                f"<td>{_pct(drop[d] if drop is not None else None)}</td>",
                f"<td>{'-' if e_d is None else f'{e_d:.3f}'}</td>",
            ]
            rows.append("<tr>" + "".join(cells) + "</tr>")
        load = "".join(f"<td>{100.0 * v:.1f}</td>" for v in layer["expert_load"])
        rows.append(
            f'<tr class="mean"><td>all (load)</td>{load}<td>{sum(layer["tokens"])}</td>'
            "<td></td><td></td><td></td></tr>"
        )
        rows.append("</table>")
        parts.append("\n".join(rows))
    return "\n".join(parts)


def _figures(paths: Sequence[str | os.PathLike[str]]) -> str:
    out = []
    for p in paths:
        out.append(
            f'<figure><img src="{png_data_uri(p)}" alt="{_e(Path(p).name)}">'
            f"<figcaption>{_e(Path(p).name)}</figcaption></figure>"
        )
    return "\n".join(out)


def write_routing_report(
    out_dir: str | os.PathLike[str],
    routing_summary: Mapping[str, Any],
    heatmap_pngs: Sequence[str | os.PathLike[str]],
    overlay_pngs: Sequence[str | os.PathLike[str]] | Mapping[str, Sequence[str | os.PathLike[str]]],
    eval_results: EvalResults | Mapping[str, Any] | None = None,
    *,
    title: str = "damex routing report",
    filename: str = "routing_report.html",
) -> Path:
    """Write ONE self-contained HTML report plus ``routing_stats.json`` into ``out_dir``.

    Args:
        out_dir: output folder (created).
        routing_summary: ``damex.evaluation.routing.summarize_layers`` / ``routing_summary``
            output; written as ``routing_stats.json`` and rendered as tables.
        heatmap_pngs: routing figures (heatmaps, the accuracy chart), embedded in order.
        overlay_pngs: per-image overlays, a list or ``{dataset name: [PNGs]}`` (one section
            per dataset).
        eval_results: COCO results (``EvalResults`` or its ``to_dict()``) for a first table.
        title: page title.
        filename: HTML file name.

    Returns:
        The HTML path. Images are embedded as base64 data URIs, so the file stands alone.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats_path = out / "routing_stats.json"
    stats_path.write_text(json.dumps(routing_summary, indent=2) + "\n", encoding="utf-8")
    body = [f"<h1>{_e(title)}</h1>"]
    if eval_results is not None:
        body.append(_eval_section(eval_results))
    body.append(_routing_section(routing_summary))
    if heatmap_pngs:
        body.append("<h2>Routing figures</h2>")
        body.append(
            '<p class="note">rows: test datasets; columns: experts; cell = share of the '
            "dataset's tokens whose top-1 expert is that expert; red outline = configured "
            "map.</p>"
        )
        body.append(_figures(heatmap_pngs))
    groups = overlay_pngs.items() if isinstance(overlay_pngs, Mapping) else [("", overlay_pngs)]
    groups = [(k, v) for k, v in groups if v]
    if groups:
        body.append("<h2>Detections coloured by the expert of their query</h2>")
        for name, paths in groups:
            if name:
                body.append(f"<h3>{_e(name)}</h3>")
            body.append(_figures(paths))
    body.append(f'<p class="note">raw numbers: {_e(stats_path.name)}</p>')
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    path = out / filename
    path.write_text(page, encoding="utf-8")
    logger.info("routing report written to %s", path)
    return path
