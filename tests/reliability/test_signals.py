"""SIGTERM and SIGINT on ``harness run-study``, each at moments of every kind: during the store's creation,
mid-training, at a cell's final evaluation and save, and at random. The process must be gone promptly, with the
handler's exit code (2, or 0 when the study was done, count too), leaving no run RUNNING; a rerun must complete
with the uninterrupted run's figures."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.interruptions import Moment, Reference, draw, interrupt_and_rerun

pytestmark = pytest.mark.reliability

PLAN = {"store": 3, "training": 3, "final": 3, "random": 9}  # per signal
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "moment" not in metafunc.fixturenames:
        return
    rng = random.Random(f"{metafunc.config.getoption('reliability_seed')}-signal")
    plans = {signum: draw(rng, PLAN) for signum in SIGNALS}
    cases = [(signum, plan[i], i) for i in range(sum(PLAN.values())) for signum, plan in plans.items()]
    ids = [f"{signal.Signals(signum).name.lower()}-{i:02d}-{moment.kind}" for signum, moment, i in cases]
    metafunc.parametrize(("signum", "moment"), [case[:2] for case in cases], ids=ids)


def test_a_signalled_study_exits_cleanly_and_reruns_to_the_uninterrupted_figures(
    signum: int,
    moment: Moment,
    tmp_path: Path,
    cli_env: dict[str, str],
    reference: Reference,
    record_property: Callable[[str, object], None],
) -> None:
    got, failure = interrupt_and_rerun(tmp_path, cli_env, signum, moment, reference)
    record_property("exit code after the signal", f"{signal.Signals(signum).name} {got.code}")
    assert not failure, failure
