"""A ``harness run-study`` interrupted at a chosen moment (SIGKILL, SIGTERM, SIGINT), then rerun to completion.

Moments are random (a time since the start) or targeted: during the store's creation (its ``.partial`` file
exists), mid-training (a progress line reached a step) or at the final evaluation and save (a cell's progress
reached its last step). They are drawn from the seed before anything runs, as shares of the reference run (one
uninterrupted run of the same two-cell study on a fresh store), so that the case ids do not depend on its timing.
"""

from __future__ import annotations

import random
import re
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.reliability import stores
from tests.reliability.processes import RUN_TIMEOUT_S, Watched, has_traceback, one_line, run_harness, sqlite_uri
from tests.studies import tiny_spec

STUDY = "intr"
CELLS = ["baseline/seed=0", "switch/seed=0"]
BUDGET = {"tokens": 1024, "checkpoint_every_steps": 2}  # 8 training steps of 8 x 16 tokens per cell
EXIT_WAIT_S = 30.0  # a signalled harness must be gone within this
EARLIEST_S = 0.5  # random moments fall between this and the reference run's end


@dataclass
class Reference:
    """The uninterrupted run: its wall time, its compared figures by cell, the training steps per cell."""

    seconds: float
    figures: dict[str, dict[str, float | None]]
    steps: int


@dataclass(frozen=True)
class Moment:
    """When to interrupt. ``random``: ``share`` of the way through the reference run's time; ``store``, ``training``
    and ``final``: ``delay`` s after the trigger (``training``: ``cell`` reached ``share`` of its steps)."""

    kind: str  # random | store | training | final
    delay: float = 0.0
    share: float = 0.0
    cell: int = 0

    def seconds(self, reference: Reference) -> float:
        return EARLIEST_S + self.share * (reference.seconds - EARLIEST_S)

    def step(self, reference: Reference) -> int:
        return 1 + int(self.share * (reference.steps - 1))

    def sooner(self) -> Moment:
        return replace(self, delay=self.delay / 2, share=self.share / 2)

    def label(self, reference: Reference) -> str:
        cell = CELLS[self.cell]
        return {
            "random": f"at {self.seconds(reference):.2f} s",
            "store": f"store creation +{self.delay:.2f} s",
            "training": f"{cell} step {self.step(reference)} +{self.delay:.2f} s",
            "final": f"{cell} final eval +{self.delay:.2f} s",
        }[self.kind]


DRAWS = {
    "store": lambda rng: Moment("store", delay=rng.uniform(0.0, 0.5)),
    "training": lambda rng: Moment("training", rng.uniform(0.0, 0.2), rng.random(), rng.randrange(len(CELLS))),
    "final": lambda rng: Moment("final", delay=rng.uniform(0.0, 0.3), cell=rng.randrange(len(CELLS))),
    "random": lambda rng: Moment("random", share=rng.random()),
}


def draw(rng: random.Random, plan: dict[str, int]) -> list[Moment]:
    """``plan[kind]`` moments of each kind, in the plan's order."""
    return [DRAWS[kind](rng) for kind, count in plan.items() for _ in range(count)]


def study_args(folder: Path, progress: bool) -> list[str]:
    """``run-study`` of the two-cell study in ``folder`` (its spec written there), into ``folder``'s store."""
    spec = tiny_spec(folder, STUDY, [cell.split("/")[0] for cell in CELLS], budget=BUDGET)
    args = ["run-study", str(spec), "--tracking-uri", sqlite_uri(folder / "mlruns" / "mlflow.db")]
    return [*args, "--checkpoint-dir", str(folder / "ck"), *([] if progress else ["--no-progress"])]


def progress(text: str, cell: str) -> tuple[int, int] | None:
    """The last ``step/total`` a cell's progress line showed."""
    found = re.findall(rf"{re.escape(cell)}:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)", text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def reference_run(folder: Path, env: dict[str, str]) -> Reference:
    folder.mkdir(parents=True)
    done = run_harness(study_args(folder, progress=True), folder, env)
    database = folder / "mlruns" / "mlflow.db"
    problems = stores.study_problems(database, STUDY, CELLS, None)
    shown = progress(done.stderr, CELLS[0])
    if done.code != 0 or problems or shown is None:
        raise RuntimeError(f"reference run: exit {done.code}, {problems}: {done.stderr[-2000:]}")
    return Reference(done.seconds, stores.figures(database, STUDY), shown[1])


def make_reference(folder: Path, env: dict[str, str]) -> Reference:
    """Two uninterrupted runs (the first also fills the tokenisation cache): their figures must agree (CPU is
    deterministic); the second's wall time spans the random moments, its figures are what reruns must match."""
    first = reference_run(folder / "first", env)
    second = reference_run(folder / "second", env)
    if second.figures != first.figures:
        raise RuntimeError(f"two uninterrupted runs differ: {first.figures} != {second.figures}")
    return second


def triggered(moment: Moment, reference: Reference, watched: Watched, store: Path) -> bool:
    if moment.kind == "random":
        return watched.elapsed() >= moment.seconds(reference)
    if moment.kind == "store":
        return any(store.glob(".mlflow.db.*.partial")) or (store / "mlflow.db").exists()
    shown = progress(watched.text(), CELLS[moment.cell])
    if shown is None:
        return False
    return shown[0] >= moment.step(reference) if moment.kind == "training" else shown[0] == shown[1]


@dataclass
class Interrupted:
    delivered: bool
    code: int | None
    exit_s: float
    at_s: float
    traceback: bool


def interrupt(folder: Path, env: dict[str, str], signum: int, moment: Moment, reference: Reference) -> Interrupted:
    """Start the study in ``folder``, send ``signum`` at ``moment``, wait for the process to end."""
    folder.mkdir(parents=True)
    watched = Watched(study_args(folder, progress=True), folder, env, folder / "first.log")
    hit = watched.wait_until(lambda: triggered(moment, reference, watched, folder / "mlruns"), RUN_TIMEOUT_S)
    if hit and moment.kind != "random":
        time.sleep(moment.delay)
    at_s = watched.elapsed()
    delivered = hit and watched.send(signum)
    sent = time.monotonic()
    code = watched.wait(EXIT_WAIT_S if delivered else RUN_TIMEOUT_S)
    return Interrupted(delivered, code, time.monotonic() - sent, at_s, has_traceback(watched.text()))


def rerun_problems(folder: Path, env: dict[str, str], reference: Reference) -> list[str]:
    """Rerun the same command to its end; what is wrong with the study afterwards."""
    done = run_harness(study_args(folder, progress=False), folder, env)
    (folder / "rerun.log").write_text(done.stdout + done.stderr)
    problems = [] if done.code == 0 else [f"rerun exit code {done.code}: {one_line(done.stderr[-300:], 200)}"]
    if has_traceback(done.stdout + done.stderr):
        problems.append("traceback in the rerun's output")
    return problems + stores.study_problems(folder / "mlruns" / "mlflow.db", STUDY, CELLS, reference.figures)


def signal_problems(signum: int, got: Interrupted, folder: Path) -> list[str]:
    """Right after a SIGTERM/SIGINT: the exit code (the handler's, 2, 0 when the study was done, or the signal's
    own before the handler is installed), the process gone in time, and no run left RUNNING."""
    problems = []
    if got.code is None:
        problems.append(f"still running {EXIT_WAIT_S:.0f} s after the signal (SIGKILLed)")
    elif got.code not in (128 + signum, 2, 0, -signum):
        problems.append(f"exit code {got.code}")
    left = stores.open_runs(folder / "mlruns" / "mlflow.db", STUDY)
    if left:
        problems.append(f"left open right after exiting: {', '.join(left)}")
    return problems


def interrupt_and_rerun(
    folder: Path, env: dict[str, str], signum: int, moment: Moment, reference: Reference
) -> tuple[Interrupted, str]:
    """One interruption (at a moment the process outlived: once more, sooner), then the rerun: what happened, and
    what is wrong ("": nothing). Skips when the signal never landed."""
    where = folder / "first"
    got = interrupt(where, env, signum, moment, reference)
    if not got.delivered:
        moment, where = moment.sooner(), folder / "sooner"
        got = interrupt(where, env, signum, moment, reference)
    detail = f"{signal.Signals(signum).name} {moment.label(reference)} (sent at {got.at_s:.1f} s): exit {got.code}"
    if not got.delivered:
        pytest.skip(f"inconclusive, the run had ended: {detail}")
    detail += f" after {got.exit_s:.1f} s{', traceback in its output' if got.traceback else ''}"
    detail += f"; before the rerun: {stores.state(where / 'mlruns' / 'mlflow.db', STUDY)}"
    problems = [] if signum == signal.SIGKILL else signal_problems(signum, got, where)
    problems += rerun_problems(where, env, reference)
    return got, f"{detail}: {'; '.join(problems)} (logs in {where})" if problems else ""
