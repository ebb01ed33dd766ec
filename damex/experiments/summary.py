"""Summaries of ``results.jsonl``: mean +- std over seeds, intervals against a baseline, plots.

Statistics (per variant, over its seeds, one run per seed):

- mean and sample standard deviation (``ddof=1``; 0 with a single seed);
- the difference of a variant's mean to the baseline's with a 95 % confidence interval from
  Welch's t (unequal variances, Welch-Satterthwaite degrees of freedom; Welch, Biometrika 1947).
  Seeds are not paired: seed ``s`` of two variants shares data order but not the model. With
  fewer than two seeds on either side there is no interval ("n/a"); when both sides have zero
  spread the interval is the point.

AP values are COCO's fractions shown in percent; ``-1`` (undefined: no ground truth) is left out
of the dataset means exactly as in ``EvalResults``.

Written to ``OUTPUT/<spec name>/`` (several specs may share one ``results.jsonl``, so that a
variant with the same name, seeds and resolved config is run once): ``summary.md``,
``summary.json`` (the same numbers), ``ap_per_dataset.png`` (test AP50 per dataset, bars = mean,
error bars = std over seeds) and ``ap50_vs_minutes.png`` (test AP50 against training minutes,
one dot per run, with the mean and std of each variant) and, for MoE variants,
``routing_shares.png`` (datasets x experts top-1 shares per layer, mean over seeds).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from damex.experiments.spec import ExperimentSpec

__all__ = [
    "summary_dir",
    "mean_std",
    "welch_interval",
    "summarize",
    "summary_markdown",
    "write_summary",
    "save_plots",
]

logger = logging.getLogger(__name__)


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample std (``ddof=1``; 0 for one value); None for no value."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return None
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def welch_interval(
    a: Sequence[float], b: Sequence[float], level: float = 0.95
) -> tuple[float, float, float] | None:
    """``mean(a) - mean(b)`` and its Welch t confidence interval ``(diff, low, high)``.

    None when either side has fewer than two values.
    """
    from scipy import stats

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return None
    diff = float(x.mean() - y.mean())
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    if se == 0:
        return diff, diff, diff
    df = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return diff, diff - half, diff + half


def _valid(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) or v < 0 else v


def _metric(split: str, dataset: str | None, key: str) -> Callable[[dict[str, Any]], Any]:
    def get(rec: dict[str, Any]) -> Any:
        m = rec.get("metrics", {}).get(split)
        if m is None:
            return None
        src = m["mean"] if dataset is None else m["datasets"].get(dataset, {})
        return _valid(src.get(key))

    return get


def _dataset_mean(split: str, key: str) -> Callable[[dict[str, Any]], Any]:
    """Mean over a run's datasets of a per-dataset number the record has no mean of."""

    def get(rec: dict[str, Any]) -> Any:
        m = rec.get("metrics", {}).get(split)
        if m is None:
            return None
        values = [_valid(d.get(key)) for d in m["datasets"].values()]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    return get


def _routing(key: str) -> Callable[[dict[str, Any]], Any]:
    def get(rec: dict[str, Any]) -> Any:
        r = rec.get("routing")
        return None if r is None or r.get(key) is None else float(r[key])

    return get


def _field(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda rec: None if rec.get(key) is None else float(rec[key])


def _columns(records: list[dict[str, Any]], splits: Sequence[str]) -> list[tuple[str, Any, str]]:
    """(column name, getter, kind) of the main table; kind: pct | num | int."""
    cols: list[tuple[str, Any, str]] = []
    for split in splits:
        cols.append((f"{split} AP", _metric(split, None, "AP"), "pct"))
        cols.append((f"{split} AP50", _metric(split, None, "AP50"), "pct"))
        if any("VOC_AP50" in r.get("metrics", {}).get(split, {}).get("mean", {}) for r in records):
            cols.append((f"{split} VOC AP50", _metric(split, None, "VOC_AP50"), "pct"))
    if "test" in splits and any(
        "foreign_share" in d
        for r in records
        for d in r.get("metrics", {}).get("test", {}).get("datasets", {}).values()
    ):
        # share of a dataset's detections that carry another dataset's label (domain confusion)
        cols.append(("test foreign %", _dataset_mean("test", "foreign_share"), "pct"))
    cols += [
        ("train min", lambda r: None if r.get("train_s") is None else r["train_s"] / 60, "num"),
        ("it/s", _field("it_s"), "num3"),
    ]
    if any(r.get("routing") for r in records):
        cols += [
            ("map acc. %", _routing("map_accuracy"), "pct"),
            ("best-assign. acc. %", _routing("best_accuracy"), "pct"),
            ("NMI", _routing("nmi"), "num3"),
            ("active experts", _routing("min_active_experts"), "num"),
        ]
    return cols


def _order_and_splits(
    records: list[dict[str, Any]], spec: ExperimentSpec | None
) -> tuple[list[str], list[str], str | None]:
    """Variant order, evaluated splits (the spec's first, then new ones) and the baseline."""
    if spec is not None:
        order = [v.name for v in spec.variants]
        splits = list(spec.eval_splits)
        baseline = spec.baseline
    else:
        order, splits, baseline = [], [], None
    for r in records:
        if r["variant"] not in order:
            order.append(r["variant"])
        for s in r.get("metrics", {}):
            if s not in splits:
                splits.append(s)
    return order, splits, baseline


def _datasets(records: list[dict[str, Any]], splits: Sequence[str]) -> list[str]:
    """Every dataset evaluated in some record and split, in first-seen order."""
    datasets: list[str] = []
    for r in records:
        for s in splits:
            for d in r.get("metrics", {}).get(s, {}).get("datasets", {}):
                if d not in datasets:
                    datasets.append(d)
    return datasets


def _table(
    by_variant: dict[str, list[dict[str, Any]]], cols: list[tuple[str, Any, str]]
) -> dict[str, dict[str, Any]]:
    """``{variant: {column: {"mean", "std", "n", "values"}}}`` of the main table."""
    table: dict[str, dict[str, Any]] = {}
    for v, rs in by_variant.items():
        row = {}
        for name, get, _ in cols:
            vals = [get(r) for r in rs]
            vals = [x for x in vals if x is not None]
            ms = mean_std(vals)
            row[name] = {
                "mean": None if ms is None else ms[0],
                "std": None if ms is None else ms[1],
                "n": len(vals),
                "values": vals,
            }
        table[v] = row
    return table


def _per_dataset(
    by_variant: dict[str, list[dict[str, Any]]], splits: Sequence[str], datasets: Sequence[str]
) -> dict[str, Any]:
    """``{split: {metric: {variant: {dataset: {"mean", "std", "n"}}}}}`` (empty cells left out)."""
    per_dataset: dict[str, Any] = {}
    for s in splits:
        per_dataset[s] = {}
        for key in ("AP", "AP50", "VOC_AP50"):
            block = {}
            for v, rs in by_variant.items():
                cells = {}
                for d in datasets:
                    vals = [x for x in (_metric(s, d, key)(r) for r in rs) if x is not None]
                    ms = mean_std(vals)
                    if ms is not None:
                        cells[d] = {"mean": ms[0], "std": ms[1], "n": len(vals)}
                if cells:
                    block[v] = cells
            if block:
                per_dataset[s][key] = block
    return per_dataset


def _diffs(
    table: dict[str, dict[str, Any]],
    order: Sequence[str],
    baseline: str | None,
    cols: list[tuple[str, Any, str]],
) -> dict[str, Any]:
    """``{variant: {column: {"diff", "low", "high"} | None}}`` against the baseline (Welch)."""
    diff: dict[str, Any] = {}
    if baseline is not None and baseline in table:
        for v in order:
            if v == baseline:
                continue
            diff[v] = {}
            for name, _, _kind in cols:
                ci = welch_interval(table[v][name]["values"], table[baseline][name]["values"])
                diff[v][name] = None if ci is None else dict(zip(("diff", "low", "high"), ci))
    return diff


_ROUTING_KEYS = ("map_accuracy", "best_accuracy", "nmi", "mean_routing_entropy", "active_experts")


def _routing_summary(by_variant: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per MoE variant and layer: mean/std of the routing metrics and the mean top-1 shares."""
    routing: dict[str, Any] = {}
    for v, rs in by_variant.items():
        runs = [r["routing"] for r in rs if r.get("routing")]
        if not runs:
            continue
        layers = []
        for i, layer in enumerate(runs[0]["layers"]):
            same = [r["layers"][i] for r in runs if len(r["layers"]) > i]
            entry: dict[str, Any] = {"name": layer["name"], "n": len(same)}
            for key in _ROUTING_KEYS:
                ms = mean_std([x[key] for x in same if x.get(key) is not None])
                entry[key] = None if ms is None else {"mean": ms[0], "std": ms[1]}
            shares = [np.asarray(x["counts"], float) for x in same]  # [D, E] token counts
            shares = [c / np.maximum(c.sum(1, keepdims=True), 1) for c in shares]
            entry["mean_share"] = np.mean(shares, axis=0).tolist()
            layers.append(entry)
        routing[v] = {"datasets": runs[0]["datasets"], "layers": layers}
    return routing


def summarize(records: list[dict[str, Any]], spec: ExperimentSpec | None = None) -> dict[str, Any]:
    """Per variant mean/std of every reported number and the differences to the baseline.

    Args:
        records: ``results.jsonl`` records (several specs may share a file: all are used).
        spec: gives the variant order, the baseline and the splits (default: from records).

    Returns:
        JSON-able ``{"variants": [names], "baseline", "splits", "datasets",
        "table": {variant: {column: {"mean", "std", "n", "values"}}},
        "per_dataset": {split: {metric: {variant: {dataset: {"mean", "std", "n"}}}}},
        "diff": {variant: {column: {"diff", "low", "high"} | None}},
        "seeds": {variant: [seeds]}}``.
    """
    order, splits, baseline = _order_and_splits(records, spec)
    by_variant = {v: [r for r in records if r["variant"] == v] for v in order}
    by_variant = {v: sorted(rs, key=lambda r: r["seed"]) for v, rs in by_variant.items() if rs}
    order = [v for v in order if v in by_variant]
    datasets = _datasets(records, splits)
    cols = _columns(records, splits)
    table = _table(by_variant, cols)
    return {
        "routing": _routing_summary(by_variant),
        "variants": order,
        "baseline": baseline if baseline in table else None,
        "splits": splits,
        "datasets": datasets,
        "columns": [[name, kind] for name, _, kind in cols],
        "table": table,
        "per_dataset": _per_dataset(by_variant, splits, datasets),
        "diff": _diffs(table, order, baseline, cols),
        "seeds": {v: [r["seed"] for r in rs] for v, rs in by_variant.items()},
        "iterations": {
            v: sorted({r.get("iterations") for r in rs}) for v, rs in by_variant.items()
        },
    }


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "num3":
        return f"{value:.3f}"
    return f"{value:.1f}"


def _cell(c: dict[str, Any], kind: str) -> str:
    if c["mean"] is None:
        return "-"
    if c["n"] < 2:
        return _fmt(c["mean"], kind)
    return f"{_fmt(c['mean'], kind)} ± {_fmt(c['std'], kind)}"


def _main_table_lines(s: dict[str, Any], cols: list[tuple[str, str]]) -> list[str]:
    lines = [
        "Mean ± std over seeds (AP in %, COCO AP@[.5:.95] and AP50; `it/s` = training "
        "iterations per second measured in each run; routing metrics on the test split).",
        "",
        "| variant | seeds | iterations | " + " | ".join(n for n, _ in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for v in s["variants"]:
        seeds = ",".join(str(x) for x in s["seeds"][v])
        its = ",".join(str(x) for x in s["iterations"][v])
        cells = [_cell(s["table"][v][n], k) for n, k in cols]
        lines.append(f"| {v} | {seeds} | {its} | " + " | ".join(cells) + " |")
    return lines


def _diff_lines(s: dict[str, Any], cols: list[tuple[str, str]]) -> list[str]:
    """The table of differences to the baseline, then the equal-wall-clock iteration ratios."""
    base = s["baseline"]
    lines = [
        "",
        f"Difference to **{base}** (variant − {base}) with a 95 % Welch t interval "
        "over seeds; an interval that excludes 0 is marked *.",
        "",
        "| variant | " + " | ".join(f"Δ {n}" for n, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for v, row in s["diff"].items():
        cells = []
        for n, k in cols:
            d = row[n]
            if d is None:
                cells.append("n/a")
                continue
            star = "*" if d["low"] > 0 or d["high"] < 0 else ""
            cells.append(f"{_fmt(d['diff'], k)} [{_fmt(d['low'], k)}, {_fmt(d['high'], k)}]{star}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    it_b = s["table"][base].get("it/s", {}).get("mean")
    if it_b:
        lines += [
            "",
            "Equal wall-clock: iterations a variant completes in the time the baseline "
            "needs for one (ratio of the measured iteration rates): "
            + ", ".join(
                f"{v} {s['table'][v]['it/s']['mean'] / it_b:.2f}"
                for v in s["variants"]
                if s["table"][v].get("it/s", {}).get("mean")
            ),
        ]
    return lines


def _routing_lines(routing: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Routing on the test split per MoE layer (mean ± std over seeds): accuracy against "
        "the configured map (meaningful for DAMEX only), best-assignment accuracy (each "
        "expert serving at most ceil(D/E) datasets), NMI between dataset and expert, mean "
        "per-dataset routing entropy (nats) and experts with >= 1 % of the tokens:",
        "",
        "| variant | layer | map acc. % | best-assign. acc. % | NMI | routing entropy "
        "| active experts |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, block in routing.items():
        for layer in block["layers"]:

            def cell(key: str, kind: str, layer: dict = layer) -> str:
                c = layer[key]
                if c is None:
                    return "-"
                return _cell({"mean": c["mean"], "std": c["std"], "n": layer["n"]}, kind)

            lines.append(
                f"| {v} | {layer['name']} | {cell('map_accuracy', 'pct')} | "
                f"{cell('best_accuracy', 'pct')} | {cell('nmi', 'num3')} | "
                f"{cell('mean_routing_entropy', 'num3')} | {cell('active_experts', 'num')} |"
            )
    return lines


def _per_dataset_lines(s: dict[str, Any]) -> list[str]:
    """One table per split and metric (AP50, VOC AP50; AP is in the main table's mean only)."""
    lines: list[str] = []
    for split, blocks in s["per_dataset"].items():
        for key, block in blocks.items():
            if key == "AP":
                continue
            lines += ["", f"Per-dataset {key} on {split} (%, mean ± std over seeds):", ""]
            ds = s["datasets"]
            lines.append("| variant | " + " | ".join(ds) + " |")
            lines.append("|---|" + "---|" * len(ds))
            for v, cells in block.items():
                row = [_cell(cells[d], "pct") if d in cells else "-" for d in ds]
                lines.append(f"| {v} | " + " | ".join(row) + " |")
    return lines


def summary_markdown(s: dict[str, Any], title: str = "") -> str:
    """Markdown tables of :func:`summarize`'s output."""
    cols = [(name, kind) for name, kind in s["columns"]]
    lines = [f"## {title}\n" if title else ""]
    lines += _main_table_lines(s, cols)
    if s["diff"]:
        lines += _diff_lines(s, cols)
    if s.get("routing"):
        lines += _routing_lines(s["routing"])
    lines += _per_dataset_lines(s)
    return "\n".join(lines).strip() + "\n"


def _plot_ap_per_dataset(plt: Any, s: dict[str, Any], split: str, out: Path) -> Path | None:
    """Bars of ``split`` AP50 per dataset (mean, error bar = std over seeds); None: no data."""
    block = s["per_dataset"].get(split, {}).get("AP50", {})
    ds = s["datasets"]
    if not (block and ds):
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(ds) + 2), 3.6))
    width = 0.8 / max(len(block), 1)
    x = np.arange(len(ds))
    for i, (v, cells) in enumerate(block.items()):
        means = [100 * cells[d]["mean"] if d in cells else np.nan for d in ds]
        stds = [100 * cells[d]["std"] if d in cells else 0.0 for d in ds]
        ax.bar(
            x + (i - (len(block) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=3,
            label=f"{v} (n={len(s['seeds'][v])})",
        )
    ax.set_xticks(x, ds, rotation=20)
    ax.set_ylabel(f"{split} AP50 (%)")
    ax.set_title("AP50 per dataset: mean ± std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "ap_per_dataset.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_routing_shares(plt: Any, routing: dict[str, Any], out: Path) -> Path:
    """One datasets x experts heatmap of top-1 shares per (MoE variant, layer)."""
    panels = [(v, layer) for v, block in routing.items() for layer in block["layers"]]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(4.5, 3.2 * len(panels)), 3.4), squeeze=False
    )
    for ax, (v, layer) in zip(axes[0], panels):
        share = 100 * np.asarray(layer["mean_share"])  # [D, E] percent
        ax.imshow(share, vmin=0, vmax=100, cmap="viridis")
        names = routing[v]["datasets"]
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xticks(range(share.shape[1]), [f"E{e}" for e in range(share.shape[1])], fontsize=7)
        ax.set_title(f"{v} {layer['name']} (n={layer['n']})", fontsize=8)
        for (r, c), val in np.ndenumerate(share):
            ax.text(
                c,
                r,
                f"{val:.0f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if val < 50 else "black",
            )
    fig.suptitle("test tokens' top-1 expert (% of the dataset), seed mean", fontsize=8)
    fig.tight_layout()
    path = out / "routing_shares.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_ap50_vs_minutes(
    plt: Any, s: dict[str, Any], records: list[dict[str, Any]], split: str, out: Path
) -> Path:
    """``split`` mean AP50 against training minutes: a dot per run, mean ± std per variant."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, v in enumerate(s["variants"]):
        color = f"C{i}"
        pts = [
            (r["train_s"] / 60, 100 * r["metrics"][split]["mean"]["AP50"])
            for r in records
            if r["variant"] == v and r.get("train_s") and split in r.get("metrics", {})
        ]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, color=color, alpha=0.5, s=18)
        ax.errorbar(
            np.mean(xs),
            np.mean(ys),
            xerr=np.std(xs, ddof=1) if len(xs) > 1 else 0,
            yerr=np.std(ys, ddof=1) if len(ys) > 1 else 0,
            color=color,
            marker="s",
            capsize=3,
            label=v,
        )
    ax.set_xlabel("training minutes (measured, this machine)")
    ax.set_ylabel(f"{split} mean AP50 (%)")
    ax.set_title("AP50 against training time (dots: runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "ap50_vs_minutes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_plots(s: dict[str, Any], records: list[dict[str, Any]], out: Path) -> list[Path]:
    """``ap_per_dataset.png`` and ``ap50_vs_minutes.png`` (test split, else the last split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not s["variants"]:
        return []
    split = "test" if "test" in s["splits"] else s["splits"][-1]
    written = []
    path = _plot_ap_per_dataset(plt, s, split, out)
    if path is not None:
        written.append(path)
    routing = s.get("routing") or {}
    if routing:
        written.append(_plot_routing_shares(plt, routing, out))
    written.append(_plot_ap50_vs_minutes(plt, s, records, split, out))
    return written


def summary_dir(spec: ExperimentSpec) -> Path:
    """Where a spec's summary goes: ``OUTPUT/<spec name>/`` (specs may share ``OUTPUT``)."""
    return spec.output / spec.name


def write_summary(
    spec: ExperimentSpec,
    records: list[dict[str, Any]],
    plots: bool = True,
    keys: set[str] | None = None,
) -> dict[str, Any]:
    """Write ``summary.md``, ``summary.json`` and the plots into :func:`summary_dir`.

    Args:
        spec: the spec (variant order, baseline, splits).
        records: ``results.jsonl`` records; only those of the spec's variants are used.
        plots: also write the PNG plots.
        keys: if given, only records with these run keys (the spec's planned runs: a variant
            of another spec with the same name but another config is left out); if None, the
            records of each variant name, and of its most frequent config hash when it has
            several (a summary rebuilt by another version of the code).
    """
    names = {v.name for v in spec.variants}
    records = [
        r for r in records if r["variant"] in names and (keys is None or r.get("key") in keys)
    ]
    if keys is None:  # one config per variant: the one with the most runs
        kept = []
        for name in names:
            mine = [r for r in records if r["variant"] == name]
            hashes = [r.get("config_hash") for r in mine]
            if len(set(hashes)) > 1:
                best = max(set(hashes), key=hashes.count)
                logger.warning(
                    "variant %s has runs of %d configs %s; summarizing the %d runs of %s",
                    name, len(set(hashes)), sorted(set(hashes)), hashes.count(best), best,
                )  # fmt: skip
                mine = [r for r in mine if r.get("config_hash") == best]
            kept += mine
        records = kept
    out = summary_dir(spec)
    out.mkdir(parents=True, exist_ok=True)
    s = summarize(records, spec)
    (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")
    header = (
        f"# Experiment `{spec.name}`\n\nBudget: "
        + (
            f"{spec.budget.minutes} training minutes per run"
            if spec.budget.minutes > 0
            else f"{spec.budget.iterations} iterations per run (iteration cosine schedule)"
        )
        + f"; {len(records)} finished runs; `results.jsonl` has every number per run.\n\n"
    )
    (out / "summary.md").write_text(header + summary_markdown(s), encoding="utf-8")
    if plots and records:
        try:
            save_plots(s, records, out)
        except (
            ImportError,
            RuntimeError,
            ValueError,
        ) as err:  # a table without plots is still useful
            logger.warning("plots not written: %s", err)
    return s
