"""Run logging: a JSON-lines metrics file, TensorBoard scalars and progress (a tqdm bar on a
terminal, periodic log lines without one).

Only the main process writes (house rule 13): construct :class:`RunLogger` / :class:`Progress`
with ``enabled=False`` on the other ranks and every call is a no-op.

``metrics.jsonl`` holds one JSON object per line. Training lines have ``"type": "train"`` and
the keys ``iter`` (optimizer steps done), ``epoch``, ``lr``, every loss term, ``it_s``
(iterations per second over the logging window) and ``time`` (training seconds so far);
evaluation lines have ``"type": "eval"``. On resume, lines past the resumed iteration (written
by the interrupted run after its last checkpoint) are dropped, so the file reads as one run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

__all__ = ["RunLogger", "Progress", "read_jsonl", "format_eval_table"]

logger = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        return _jsonable(v.item())
    return v


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (a truncated last line, e.g. after a kill, is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s: skipping a malformed line (%d chars)", path, len(line))
    return out


class RunLogger:
    """Writes metrics to ``<output_dir>/metrics.jsonl`` and, optionally, TensorBoard.

    Args:
        output_dir: the run directory.
        enabled: False on non-main ranks (everything becomes a no-op).
        tensorboard: also write TensorBoard event files under ``<output_dir>/tb``.
        resume_iter: when resuming, drop ``metrics.jsonl`` lines with ``iter`` beyond it.
        filename: the JSON-lines file name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        enabled: bool = True,
        tensorboard: bool = False,
        resume_iter: int | None = None,
        filename: str = "metrics.jsonl",
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / filename
        self._tb: Any = None
        self._file: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iter is not None and self.path.exists():
            self._truncate_after(resume_iter)
        elif resume_iter is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    log_dir=str(Path(output_dir) / "tb"),
                    purge_step=resume_iter + 1 if resume_iter is not None else None,
                )
            except Exception as e:  # tensorboard missing or broken: jsonl still works
                logger.warning("TensorBoard disabled: %s", e)

    def _truncate_after(self, iteration: int) -> None:
        kept = [r for r in read_jsonl(self.path) if int(r.get("iter", 0)) <= iteration]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any], *, step: int, prefix: str = "train") -> None:
        """Append one record (``type`` = ``prefix``) and write its numbers to TensorBoard.

        Args:
            record: flat dict of numbers (nested dicts are written as ``a/b`` scalars).
            step: the global optimizer step (TensorBoard x-axis).
            prefix: record type and TensorBoard tag prefix (``train`` / ``eval``).
        """
        if not self.enabled:
            return
        line = {"type": prefix, **_jsonable(record)}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, value in _flatten(record):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{prefix}/{tag}", value, global_step=step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "/"))
        else:
            out.append((key, v))
    return out


class Progress:
    """Progress over optimizer steps (rank 0 only): a tqdm bar on a terminal, log lines otherwise.

    On a terminal the bar shows ETA, loss, lr and it/s. When stderr is not a terminal (output
    redirected to a file, a batch job) the bar is off and, every ``log_every`` steps, one
    ``logging`` line reports the same fields::

        iter 40/200 (20.0%)  loss 12.3456  lr 1.00e-04  2.50 it/s  eta 0:01:04

    ``it/s`` is measured over the steps since the previous line, and the ETA is the planned
    steps left at that rate. With a time budget the run ends at whichever comes first: the ETA is
    capped by the budget left and the percentage is the larger of the step and time fractions.

    Args:
        total: planned number of steps.
        initial: steps already done (resume).
        enabled: False on non-main ranks.
        desc: bar label.
        log_every: steps between log lines without a terminal (0: no lines).
        file: the bar's stream (default: ``sys.stderr`` at construction).
        time_budget_s: training seconds the run may take (0: no time budget).
        elapsed_s: training seconds already spent (resume).
    """

    def __init__(
        self,
        *,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        desc: str = "train",
        log_every: int = 0,
        file: IO[str] | None = None,
        time_budget_s: float = 0.0,
        elapsed_s: float = 0.0,
    ) -> None:
        self._bar: Any = None
        self._total = total
        self._budget_s = max(float(time_budget_s), 0.0)
        self._t0 = time.perf_counter() - float(elapsed_s)  # when training would have started
        self._n = initial
        self._log_every = 0
        self._line_n = initial
        self._line_t = time.perf_counter()
        if not enabled:
            return
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            dynamic_ncols=True,
            file=file if file is not None else sys.stderr,
            disable=None,  # off when the stream is not a terminal: log lines instead
            mininterval=1.0,
        )
        if self._bar.disable:
            self._log_every = max(int(log_every), 0)

    def update(self, n: int = 1, *, loss: float | None = None, lr: float | None = None) -> None:
        if self._bar is None:
            return
        self._n += n
        if self._log_every:
            if self._n // self._log_every > (self._n - n) // self._log_every:
                self._log_line(loss, lr)
            return
        post: dict[str, str] = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if lr is not None:
            post["lr"] = f"{lr:.2e}"
        if post:
            self._bar.set_postfix(post, refresh=False)
        self._bar.update(n)

    def _log_line(self, loss: float | None, lr: float | None) -> None:
        now = time.perf_counter()
        rate = (self._n - self._line_n) / max(now - self._line_t, 1e-9)
        self._line_n, self._line_t = self._n, now
        left = max(self._total - self._n, 0)
        eta_s = left / rate if rate > 0 else math.inf
        frac = self._n / self._total if self._total > 0 else 0.0
        if self._budget_s > 0:
            spent = now - self._t0
            eta_s = min(eta_s, max(self._budget_s - spent, 0.0))
            frac = max(frac, min(spent / self._budget_s, 1.0))
        eta = _format_seconds(eta_s) if math.isfinite(eta_s) else "?"
        pct = 100.0 * frac
        logger.info(
            "iter %d/%d (%.1f%%)  loss %.4f  lr %.2e  %.2f it/s  eta %s",
            self._n,
            self._total,
            pct,
            math.nan if loss is None else loss,
            math.nan if lr is None else lr,
            rate,
            eta,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _format_seconds(seconds: float) -> str:
    """``H:MM:SS`` (hours may exceed 24)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_eval_table(
    per_dataset: dict[str, dict[str, float]], metrics: tuple[str, ...] = ("AP", "AP50", "AP75")
) -> str:
    """A fixed-width text table: one row per dataset plus the mean row.

    Args:
        per_dataset: ``{dataset: {metric: value in [0, 1]}}``.
        metrics: columns (values printed x100).
    """
    names = list(per_dataset)
    width = max([len("dataset"), len("mean")] + [len(n) for n in names])
    header = f"{'dataset':<{width}} " + " ".join(f"{m:>7}" for m in metrics)
    lines = [header, "-" * len(header)]
    for n in names:
        row = per_dataset[n]
        lines.append(
            f"{n:<{width}} "
            + " ".join(f"{100 * row[m]:7.2f}" if m in row else f"{'-':>7}" for m in metrics)
        )
    if names:
        means = []
        for m in metrics:
            vals = [per_dataset[n][m] for n in names if m in per_dataset[n]]
            means.append(f"{100 * sum(vals) / len(vals):7.2f}" if vals else f"{'-':>7}")
        lines.append("-" * len(header))
        lines.append(f"{'mean':<{width}} " + " ".join(means))
    return "\n".join(lines)
