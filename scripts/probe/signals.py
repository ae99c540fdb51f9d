"""SIGTERM and SIGINT, 18 cases each: 3 during the store's creation, 3 mid-training, 3 at a cell's final
evaluation and save, 9 at random moments. Right after the exit no run may be RUNNING; a rerun must complete
with the uninterrupted run's figures."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable

import interrupts
from common import CaseResult, Probe

PER_SIGNAL = {"store": 3, "training": 3, "final": 3, "random": 9}


def training_moment(rng: random.Random, steps: int) -> interrupts.Moment:
    delay = rng.uniform(0.0, 0.2)
    cell = rng.randrange(len(interrupts.CELLS))
    return interrupts.Moment("training", delay, cell, rng.randint(1, steps - 1))


def moments(rng: random.Random, reference_s: float, steps: int) -> list[interrupts.Moment]:
    """One signal's 18 moments, drawn from ``rng``."""
    plan = [interrupts.Moment("store", rng.uniform(0.0, 0.5)) for _ in range(PER_SIGNAL["store"])]
    plan += [training_moment(rng, steps) for _ in range(PER_SIGNAL["training"])]
    plan += [
        interrupts.Moment("final", rng.uniform(0.0, 0.3), rng.randrange(len(interrupts.CELLS)))
        for _ in range(PER_SIGNAL["final"])
    ]
    plan += [interrupts.Moment("random", rng.uniform(0.5, reference_s)) for _ in range(PER_SIGNAL["random"])]
    return plan


def run_signals(
    probe: Probe, reference: interrupts.Reference, report: Callable[[CaseResult], None]
) -> list[CaseResult]:
    rng = random.Random(f"{probe.seed}-signal")
    plans = {signum: moments(rng, reference.seconds, reference.steps) for signum in (signal.SIGTERM, signal.SIGINT)}
    results = []
    for i in range(sum(PER_SIGNAL.values())):
        for signum, plan in plans.items():
            moment = plan[i]
            name = f"{signal.Signals(signum).name.lower()}-{i:02d}-{moment.kind}"
            if not probe.wants(name):
                continue
            results.append(interrupts.run_case(probe, "signal", name, signum, moment, reference))
            report(results[-1])
    return results
