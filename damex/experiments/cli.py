"""``damex experiments -c SPEC.yaml``: run a multi-seed experiment spec (resumable)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from damex.errors import DamexError
from damex.experiments.runner import FAILURES, RESULTS, read_results, run_experiments
from damex.experiments.spec import load_spec
from damex.experiments.summary import summary_dir, write_summary

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
Run every variant of an experiment spec with every seed, one run after another, each as a `damex
train` subprocess (budget: train.max_iters, or train.time_budget_min when the spec gives
minutes); its final evaluation gives the test split, and `damex evaluate` of its last checkpoint
every other eval split (val; the spec's eval_splits, default [val, test]). One JSON line per
finished run goes to OUT/results.jsonl: variant, seed, config hash, git commit, iterations,
training seconds and iteration rate, per-dataset COCO AP/AP50 (and VOC AP50 when evaluation
reports it) on every split, and the order-independent routing metrics of MoE models (best-
assignment accuracy, NMI, routing entropy, active experts; plus the accuracy against the
configured map).

Resumable: runs already in results.jsonl are skipped, so a killed runner continues where it
stopped (the interrupted run starts again); specs sharing an output folder share runs of the
same variant name, seed and resolved config. After every run OUT/<spec name>/summary.md (mean
+- std over seeds, 95 % Welch t intervals for each difference against the spec's baseline),
summary.json and the plots ap_per_dataset.png and ap50_vs_minutes.png are rewritten.

Spec format: see configs/experiments/*.yaml (name, output, baseline, seeds, budget,
eval_splits, overrides, variants: [{name, config, overrides}]).
"""

_EPILOG = """\
examples:
  damex experiments -c configs/experiments/full_mixture.yaml
  damex experiments -c configs/experiments/full_mixture.yaml --max-runs 3   # in pieces
  damex experiments -c configs/experiments/full_mixture.yaml --dry-run      # print commands
  damex experiments -c configs/experiments/full_mixture.yaml --summary-only # re-tabulate
  nohup damex experiments -c SPEC.yaml > experiments.log 2>&1 &            # background
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="damex experiments",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--spec", required=True, help="experiment spec YAML")
    p.add_argument("--out", default=None, help="output folder (default: the spec's 'output')")
    p.add_argument(
        "--max-runs", type=int, default=None, help="stop after this many new runs (resumable)"
    )
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT", help="run only these")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs at the same time, in plan order (seed-major: with one per variant, the "
        "variants of a seed train side by side under the same load); default 1",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS / MKL_NUM_THREADS of each run's processes (default: inherited)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands of unfinished runs")
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="rewrite summary.md/json and the plots from results.jsonl; run nothing",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for a spec error, 1 when a run failed)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        spec = load_spec(args.spec)
        if args.out:
            spec = replace(spec, output=Path(args.out))
        if args.summary_only:
            records = read_results(spec.output / RESULTS)
            write_summary(spec, records)  # by variant name: the code may have changed since
            print((summary_dir(spec) / "summary.md").read_text(encoding="utf-8"))
            return 0
        failures = spec.output / FAILURES
        before = failures.stat().st_size if failures.is_file() else 0
        records = run_experiments(
            spec,
            max_runs=args.max_runs,
            only=args.only,
            dry_run=args.dry_run,
            parallel=args.parallel,
            threads=args.threads,
        )
    except DamexError as exc:
        print(f"damex experiments: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("damex experiments: interrupted (finished runs are kept)", file=sys.stderr)
        return 130
    if args.dry_run:
        return 0
    print(f"{len(records)} finished runs in {spec.output / RESULTS}")
    print(f"summary: {summary_dir(spec) / 'summary.md'}")
    after = failures.stat().st_size if failures.is_file() else 0
    if after > before:
        print(f"some runs failed: see {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
