"""Training hooks: everything around the optimizer step (detectron2's ``HookBase`` pattern).

The trainer (:class:`damex.engine.trainer.Trainer`) calls, for every registered hook and in
registration order::

    before_train()
    for each optimizer step:
        before_step(); trainer.run_step(); after_step()
        (the ranks agree on whether to stop)
        after_epoch()           # when the step completed an epoch
    after_train()               # not after an error
    close()                     # always, also after an error (release files, handlers)

A hook holds its own state as plain attributes; it reads and changes the run through
``self.trainer`` (set by :meth:`Trainer.register_hooks`): ``trainer.state`` (the checkpointed
counters), ``trainer.step_info`` (what the last ``run_step`` did), ``trainer.request_stop``.
State that must survive a resume goes into ``trainer.state`` (:class:`TrainState`), which the
checkpoint carries.

The default hooks, in order (:meth:`Trainer.build_hooks`):

* :class:`StopOnSignal`: SIGTERM / SIGINT -> stop after the current step, with a checkpoint.
* :class:`EMAUpdate`: the EMA of the weights after every applied step.
* :class:`LRScheduleAndBudget`: the per-step lr schedule, ``train.max_iters`` and
  ``train.time_budget_min``.
* :class:`MetricsLogger`: the logging window (``metrics.jsonl``, TensorBoard), the progress bar.
* :class:`Evaluation`: periodic and final evaluation, best mean AP (``best.pth``) and each
  dataset's best AP, the final ``eval/results.{json,md}``.
* :class:`PeriodicCheckpoint`: ``last.pth`` at every epoch end and at the end of the run,
  ``epoch_XXXX.pth`` every ``train.checkpoint_every`` epochs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from typing import TYPE_CHECKING, Any

import torch

from damex.engine import checkpoint as ckpt
from damex.engine import distributed as dist_utils
from damex.engine.ema import ModelEMA
from damex.engine.inference import run_inference
from damex.engine.logging import Progress, RunLogger
from damex.engine.optim import LRScheduler, step_scheduler

if TYPE_CHECKING:
    from damex.engine.trainer import Trainer

__all__ = [
    "HookBase",
    "StopOnSignal",
    "EMAUpdate",
    "LRScheduleAndBudget",
    "MetricsLogger",
    "Evaluation",
    "PeriodicCheckpoint",
]

logger = logging.getLogger(__name__)


class HookBase:
    """Base class of the training hooks; every method is a no-op by default.

    Attributes:
        trainer: the trainer that runs the hook (set by ``Trainer.register_hooks``).
    """

    trainer: Trainer

    def before_train(self) -> None:
        """Before the first step (after set-up and resume)."""

    def before_step(self) -> None:
        """Before every ``run_step``."""

    def after_step(self) -> None:
        """After every ``run_step`` (``trainer.step_info`` describes it)."""

    def after_epoch(self) -> None:
        """After the step that completed an epoch (``trainer.state.epoch`` counts it)."""

    def after_train(self) -> None:
        """After the last step of a run that ended normally (completed or stopped)."""

    def close(self) -> None:
        """Release resources; called after ``after_train`` and also when the run fails."""


class StopOnSignal(HookBase):
    """SIGTERM / SIGINT -> stop at the next step boundary with a checkpoint (main thread only).

    A second signal gets the previous handler's behaviour (e.g. SIGINT raises at once).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: default behaviour
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = True
        logger.warning("signal %d: stopping after this step (checkpoint will be written)", signum)

    def before_train(self) -> None:
        for sig in self.signals:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def after_step(self) -> None:
        if self.requested:
            self.trainer.request_stop("signal")

    def after_train(self) -> None:
        self.close()

    def close(self) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, old)
        self._old = {}


class EMAUpdate(HookBase):
    """Update the EMA of the weights after every applied (not skipped) step."""

    def __init__(self, ema: ModelEMA) -> None:
        self.ema = ema

    def after_step(self) -> None:
        if not self.trainer.step_info.skipped:
            self.ema.update(self.trainer.model)


class LRScheduleAndBudget(HookBase):
    """Per-step lr schedule and the step / time budgets.

    Elapsed time (``trainer.state.elapsed_s``, measured by ``run_step`` before the optimizer
    step) drives ``time_cosine`` and the time budget; the run stops after the step in which the
    budget is reached.

    Args:
        scheduler: the lr scheduler (stepped once per optimizer step, skipped ones included).
        max_iters: stop after this many optimizer steps (0: no limit).
        time_budget_s: stop once this many training seconds have passed (0: no limit).
    """

    def __init__(self, scheduler: LRScheduler, *, max_iters: int, time_budget_s: float) -> None:
        self.scheduler = scheduler
        self.max_iters = max_iters
        self.time_budget_s = time_budget_s

    def after_step(self) -> None:
        st = self.trainer.state
        step_scheduler(self.scheduler, st.elapsed_s)
        if self.max_iters > 0 and st.iteration >= self.max_iters:
            self.trainer.request_stop("max_iters")
        if self.time_budget_s > 0 and st.elapsed_s >= self.time_budget_s:
            self.trainer.request_stop("time_budget")


class MetricsLogger(HookBase):
    """The logging window: averages the losses of the finite micro-batches and writes a
    ``train`` record every ``log_every`` steps and at every epoch end (``metrics.jsonl`` and
    TensorBoard through ``run_log``); drives the progress (rank 0): a bar on a terminal, else a
    log line every ``log_every`` steps with iteration, loss, lr, it/s and ETA.

    The window sums live in ``trainer.state`` so that a resumed run logs the same records.

    Args:
        run_log: the run's metrics writer (no-op on other ranks).
        log_every: steps per record.
        total_iters: planned steps (progress bar, ETA).
        time_budget_s: ``train.time_budget_min`` in seconds (0: none); caps the ETA.
        enabled: False on other ranks (no bar).
    """

    def __init__(
        self,
        run_log: RunLogger,
        *,
        log_every: int,
        total_iters: int,
        enabled: bool,
        time_budget_s: float = 0.0,
    ) -> None:
        self.run_log = run_log
        self.log_every = log_every
        self.total_iters = total_iters
        self.time_budget_s = time_budget_s
        self.enabled = enabled
        self.progress: Progress | None = None
        self.window_t0 = 0.0
        self.last_grad_norm = float("nan")  # of the last applied step

    def before_train(self) -> None:
        self.progress = Progress(
            total=self.total_iters,
            initial=self.trainer.state.iteration,
            enabled=self.enabled,
            log_every=self.log_every,
            time_budget_s=self.time_budget_s,
            elapsed_s=self.trainer.state.elapsed_s,
        )
        self.window_t0 = time.perf_counter()

    def after_step(self) -> None:
        t = self.trainer
        st, step = t.state, t.step_info
        for losses in step.losses:
            self._accumulate(losses)
        st.window_steps += 1
        if not step.skipped:
            self.last_grad_norm = step.grad_norm
        mean_loss = st.window_sums.get("loss", 0.0) / max(st.window_sums.get("#loss", 0.0), 1.0)
        if self.progress is not None:
            self.progress.update(1, loss=mean_loss, lr=step.lr)
        if st.iteration % self.log_every == 0 or st.epoch_micro >= t.micro_per_epoch:
            self._log_window(step.lr)

    def _accumulate(self, losses: dict[str, float]) -> None:
        st = self.trainer.state
        for k, val in losses.items():
            if math.isfinite(val):
                st.window_sums[k] = st.window_sums.get(k, 0.0) + val
                st.window_sums[f"#{k}"] = st.window_sums.get(f"#{k}", 0.0) + 1.0
        st.window_count += 1

    def _log_window(self, lr: float) -> None:
        """Write the window's mean over ranks (collective: every rank calls it)."""
        st = self.trainer.state
        local = {
            k: torch.tensor(v / st.window_sums[f"#{k}"])
            for k, v in st.window_sums.items()
            if not k.startswith("#") and st.window_sums.get(f"#{k}", 0.0) > 0
        }
        # same keys on every rank (a NaN-only stat may be absent on one): gather the key union
        keys = sorted(set().union(*dist_utils.all_gather_object(sorted(local))))
        vals = {k: local.get(k, torch.tensor(float("nan"))) for k in keys}
        means = dist_utils.reduce_dict_mean(vals)
        dt = max(time.perf_counter() - self.window_t0, 1e-9)
        record = {
            "iter": st.iteration,
            "epoch": st.epoch,
            "lr": lr,
            **{k: means[k] for k in keys},
            "grad_norm": self.last_grad_norm,
            "it_s": st.window_steps / dt,
            "time": st.elapsed_s,
            "nonfinite": st.nonfinite_total,
        }
        self.run_log.log(record, step=st.iteration)
        st.window_sums, st.window_count, st.window_steps = {}, 0, 0
        self.window_t0 = time.perf_counter()

    def after_train(self) -> None:
        self.close()
        reason = self.trainer.stop_reason
        if reason is not None:
            logger.info("stopping at iteration %d: %s", self.trainer.state.iteration, reason)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None


class Evaluation(HookBase):
    """Periodic and final evaluation with best-AP tracking.

    Every ``eval_every`` epochs and after the last epoch: per-dataset AP on the evaluation
    datasets (the EMA weights when there are some), an ``eval`` record in ``metrics.jsonl``,
    ``best.pth`` when the mean AP improves, and each dataset's own best AP (kept separately: the
    official code compared APs of different datasets with one holder). At the end of a run that
    was not stopped by a signal, a final evaluation unless the last step was just evaluated; its
    table goes to ``<output.dir>/eval/results.{json,md}``.

    Args:
        eval_every: epochs between evaluations (0: only at the end).
        epochs: planned epochs (the last one is always evaluated).

    Attributes:
        final_results: the last evaluation when it is of the final step (rank 0), else None.
        last_routing: routing statistics of the last evaluation (final MoE evaluations only).
    """

    def __init__(self, *, eval_every: int, epochs: int) -> None:
        self.eval_every = eval_every
        self.epochs = epochs
        self.last_results: Any = None
        self.last_eval_iter = -1
        self.last_routing: Any = None
        self.final_results: Any = None

    def after_epoch(self) -> None:
        epoch = self.trainer.state.epoch
        is_last = epoch >= self.epochs
        if self.eval_every > 0 and epoch % self.eval_every == 0 or is_last:
            self.last_results = self.evaluate(final=is_last)
            self.last_eval_iter = self.trainer.state.iteration

    def after_train(self) -> None:
        t = self.trainer
        iteration = t.state.iteration
        results = self.last_results if self.last_eval_iter == iteration else None
        if t.stop_reason != "signal" and self.last_eval_iter != iteration:
            results = self.evaluate(final=True)
        if t.is_main and results is not None:  # the summary (detections: damex evaluate)
            (t.out_dir / "eval").mkdir(exist_ok=True)
            (t.out_dir / "eval" / "results.json").write_text(results.to_json() + "\n")
            (t.out_dir / "eval" / "results.md").write_text(results.to_markdown())
        self.final_results = results

    def evaluate(self, *, final: bool) -> Any:
        """Run inference on the test loaders and track the best APs (collective)."""
        t = self.trainer
        if not t.test_loaders:
            return None
        t0 = time.perf_counter()
        want_routing = final and t.cfg.uses_moe  # the final report reuses these counts
        results, routing = run_inference(
            t.eval_model,
            t.postprocess,
            t.test_loaders,
            t.data.label_space,
            routing_stats=want_routing,
            restrict=t.cfg.eval.restrict_to_dataset_labels,
            amp_dtype=t.amp_dtype,
            routing_tokens=t.cfg.eval.routing_tokens,
            expert_of_dataset=t.data.expert_of_dataset,
            matcher=t.criterion.matcher if want_routing else None,
            voc_metric=t.cfg.eval.voc_metric,
            label_mask=t.cfg.eval.label_mask,
        )
        self.last_routing = routing
        improved = False
        if t.is_main and results is not None:
            logger.info(
                "evaluation at iteration %d (%.1f s):\n%s",
                t.state.iteration,
                time.perf_counter() - t0,
                results.to_markdown(),
            )
            improved = self._record(results, final=final)
        # every rank keeps the same view of the best values (they go into checkpoints)
        st = t.state
        st.best_mean_ap, st.best_per_dataset, improved = dist_utils.broadcast_object(
            (st.best_mean_ap, st.best_per_dataset, improved)
        )
        if improved:  # every rank: gathering an expert-parallel model is collective
            state = t.best_checkpoint(results)
            if t.is_main:
                ckpt.save_checkpoint(ckpt.best_path(t.out_dir), state)
                logger.info(
                    "new best mean AP %.4f -> %s", st.best_mean_ap, ckpt.best_path(t.out_dir)
                )
        return results

    def _record(self, results: Any, *, final: bool) -> bool:
        """Log the ``eval`` record, update the best values (rank 0); returns whether improved."""
        t = self.trainer
        st = t.state
        mean_ap = float(results.mean_ap)
        record: dict[str, Any] = {
            "iter": st.iteration,
            "epochs_done": st.epoch + st.epoch_micro / t.micro_per_epoch
            if st.epoch_micro
            else st.epoch,
            "mean_ap": mean_ap,
            "mean_ap50": float(results.mean_ap50),
            "final": final,
        }
        for name, m in results.datasets.items():
            record[f"ap/{name}"] = float(m.ap)
            record[f"ap50/{name}"] = float(m.ap50)
            best = st.best_per_dataset.get(name)
            if best is None or m.ap > best["ap"]:
                st.best_per_dataset[name] = {
                    "ap": float(m.ap),
                    "iteration": st.iteration,
                    "epoch": st.epoch,
                }
        improved = st.best_mean_ap is None or mean_ap > st.best_mean_ap
        if improved:
            st.best_mean_ap = mean_ap
        record["best_mean_ap"] = st.best_mean_ap
        t.run_log.log(record, step=st.iteration, prefix="eval")
        return improved


class PeriodicCheckpoint(HookBase):
    """``last.pth`` at every epoch end (``epoch_XXXX.pth`` every ``checkpoint_every`` epochs)
    and at the end of the run when the last step was not saved yet.

    Registered after :class:`Evaluation`, so a checkpoint holds the best values of the
    evaluation of the same epoch.

    Args:
        checkpoint_every: epochs between ``epoch_XXXX.pth`` copies (0: none).
    """

    def __init__(self, *, checkpoint_every: int) -> None:
        self.checkpoint_every = checkpoint_every
        self.saved_iter = -1

    def after_epoch(self) -> None:
        epoch = self.trainer.state.epoch
        epoch_file = self.checkpoint_every > 0 and epoch % self.checkpoint_every == 0
        self.trainer.save(epoch_file=epoch_file)
        self.saved_iter = self.trainer.state.iteration

    def after_train(self) -> None:
        if self.saved_iter != self.trainer.state.iteration:
            self.trainer.save()
            self.saved_iter = self.trainer.state.iteration
