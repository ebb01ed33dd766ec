"""The training hook that moves the MoE loss weight along ``moe.loss_schedule``."""

from __future__ import annotations

from damex.engine.hooks import HookBase

__all__ = ["MoELossSchedule"]


class MoELossSchedule(HookBase):
    """Before every step, sets the criterion's MoE loss weight for the fraction of training done.

    Progress is ``elapsed / time budget`` under a time budget (``train.time_budget_min``),
    else ``iteration / total iterations``; the weight is
    :func:`damex.moe.losses.scheduled_weight` of it (``SetCriterion.set_progress``).

    Args:
        total_iters: the run's optimizer steps (its ``max_iters`` or epochs x steps).
        time_budget_s: the training time budget in seconds (0: none).
    """

    def __init__(self, *, total_iters: int, time_budget_s: float = 0.0) -> None:
        self.total_iters = max(1, int(total_iters))
        self.time_budget_s = float(time_budget_s)

    def progress(self) -> float:
        st = self.trainer.state
        if self.time_budget_s > 0:
            return min(1.0, st.elapsed_s / self.time_budget_s)
        return min(1.0, st.iteration / self.total_iters)

    def before_step(self) -> None:
        self.trainer.criterion.set_progress(self.progress())
