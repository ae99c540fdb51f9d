"""The trial budget ``n_trials``, shared by every worker of a tuning study.

A trial only trains if fewer than ``n_trials`` counted trials (complete, pruned, running, waiting,
or failed and not retried) have lower numbers; a surplus trial that a race let through fails at
once (user attr ``harness.surplus``) and is not counted, nor is an interrupted one.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.tune.attrs import INTERRUPTED_ATTR, RETRY_HISTORY, SURPLUS_ATTR

_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)


class SurplusTrial(Exception):
    """The study already has its trials; this one was created by a race between workers."""


def _retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    retried: set[int] = set()
    for trial in trials:
        retried.update(trial.system_attrs.get(RETRY_HISTORY, []))
    return retried


def _uncounted(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get(SURPLUS_ATTR) or trial.user_attrs.get(INTERRUPTED_ATTR))


def counted(trials: list[FrozenTrial], below: int | None = None) -> int:
    """Trials that use up the budget: all but surplus or interrupted ones and failures that were re-queued."""
    retried = _retried_numbers(trials)
    return sum(
        1
        for t in trials
        if (below is None or t.number < below)
        and t.state in _COUNTED
        and not (t.state == TrialState.FAIL and (t.number in retried or _uncounted(t)))
    )


class Budget:
    """Stops the study once ``n_trials`` counted trials exist (across every worker)."""

    def __init__(self, n_trials: int | None) -> None:
        self.n_trials = n_trials

    def admits(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        if self.n_trials is None:
            return True
        return counted(study.get_trials(deepcopy=False), below=trial.number) < self.n_trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.n_trials is not None and counted(study.get_trials(deepcopy=False)) >= self.n_trials:
            study.stop()
