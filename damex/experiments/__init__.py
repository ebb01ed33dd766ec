"""Multi-seed experiments: specs of variants x seeds, a resumable runner, summaries."""

from damex.experiments.runner import PlannedRun, RunFailed, plan_runs, read_results, run_experiments
from damex.experiments.spec import Budget, ExperimentSpec, Variant, load_spec, spec_from_dict
from damex.experiments.summary import summarize, summary_markdown, welch_interval, write_summary

__all__ = [
    "Budget",
    "ExperimentSpec",
    "PlannedRun",
    "RunFailed",
    "Variant",
    "load_spec",
    "plan_runs",
    "read_results",
    "run_experiments",
    "spec_from_dict",
    "summarize",
    "summary_markdown",
    "welch_interval",
    "write_summary",
]
