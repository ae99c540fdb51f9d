"""A ``harness run-study`` interrupted at a chosen moment (SIGKILL, SIGTERM, SIGINT), then rerun to completion.

Moments are random (a time since the start) or targeted: during the store's creation (its ``.partial`` file
exists), mid-training (a progress line reached a step) or at the final evaluation and save (a cell's progress
reached its last step). The reference is one uninterrupted run of the same two-cell study on a fresh store.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import store_checks
from common import RUN_TIMEOUT_S, CaseResult, Probe, Watched, has_traceback, one_line, run_harness, sqlite_uri
from common import tiny_spec as _tiny_spec
from common import write_yaml as _write_yaml

STUDY = "intr"
CELLS = ["baseline/seed=0", "switch/seed=0"]
TOKENS = 1024  # 8 training steps of 8 x 16 tokens per cell; a checkpoint every 2 steps
EXIT_WAIT_S = 30.0  # a signalled harness must be gone within this


def study_spec(folder: Path, name: str = STUDY, variants: list[str] | None = None) -> Path:
    spec = _tiny_spec(name, variants or [c.split("/")[0] for c in CELLS], TOKENS, checkpoint_every_steps=2)
    return _write_yaml(folder / f"{name}.yaml", spec)


def study_args(folder: Path, spec: Path, progress: bool) -> list[str]:
    args = ["run-study", str(spec), "--tracking-uri", sqlite_uri(folder / "mlruns" / "mlflow.db")]
    return [*args, "--checkpoint-dir", str(folder / "ck"), *([] if progress else ["--no-progress"])]


@dataclass(frozen=True)
class Moment:
    """When to interrupt: ``random`` at ``delay`` s after the start; else ``delay`` s after the trigger."""

    kind: str  # random | store | training | final
    delay: float
    cell: int = 0  # training/final: which cell's progress line
    step: int = 0  # training: the step the progress line must have reached

    def label(self) -> str:
        if self.kind == "random":
            return f"at {self.delay:.2f} s"
        cell = CELLS[self.cell]
        where = {"store": "store creation", "training": f"{cell} step {self.step}", "final": f"{cell} final eval"}
        return f"{where[self.kind]} +{self.delay:.2f} s"

    def sooner(self) -> Moment:
        return Moment(self.kind, self.delay / 2, self.cell, max(1, self.step // 2))


@dataclass
class Reference:
    seconds: float
    figures: dict[str, dict[str, float | None]]
    steps: int  # training steps per cell, from the progress line


def progress(text: str, cell: str) -> tuple[int, int] | None:
    """The last ``step/total`` a cell's progress line showed."""
    found = re.findall(rf"{re.escape(cell)}:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)", text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def triggered(moment: Moment, watched: Watched, store: Path) -> bool:
    if moment.kind == "random":
        return watched.elapsed() >= moment.delay
    if moment.kind == "store":
        return any(store.glob(".mlflow.db.*.partial")) or (store / "mlflow.db").exists()
    shown = progress(watched.text(), CELLS[moment.cell])
    if shown is None:
        return False
    return shown[0] >= moment.step if moment.kind == "training" else shown[0] == shown[1]


def reference_run(probe: Probe, name: str) -> tuple[float, dict[str, dict[str, float | None]], int]:
    folder = probe.folder("reference", name)
    spec = study_spec(folder)
    done = run_harness(study_args(folder, spec, progress=True), folder, probe.env())
    database = folder / "mlruns" / "mlflow.db"
    problems = store_checks.study_problems(database, STUDY, CELLS, None)
    if done.code != 0 or problems:
        raise RuntimeError(f"reference run: exit {done.code}, {problems}: {done.stderr[-2000:]}")
    shown = progress(done.stderr, CELLS[0])
    return done.seconds, store_checks.figures(database, STUDY), shown[1] if shown else 8


def make_reference(probe: Probe) -> Reference:
    """Two uninterrupted runs (the first also fills the tokenisation cache): their figures must agree (CPU is
    deterministic), the second's wall time bounds the random moments, its figures are what reruns must match."""
    _, first, _ = reference_run(probe, "study-1")
    seconds, figures, steps = reference_run(probe, "study-2")
    if figures != first:
        raise RuntimeError(f"two uninterrupted runs differ: {first} != {figures}")
    return Reference(seconds, figures, steps)


@dataclass
class Interrupted:
    delivered: bool
    code: int | None
    exit_s: float
    at_s: float
    traceback: bool


def interrupt(probe: Probe, folder: Path, signum: int, moment: Moment) -> Interrupted:
    """Start the study, send ``signum`` at ``moment``, wait for the process to end."""
    spec = study_spec(folder)
    watched = Watched(study_args(folder, spec, progress=True), folder, probe.env(), folder / "first.log")
    hit = watched.wait_until(lambda: triggered(moment, watched, folder / "mlruns"), RUN_TIMEOUT_S)
    if hit and moment.kind != "random":
        time.sleep(moment.delay)
    at_s = watched.elapsed()
    delivered = hit and watched.send(signum)
    sent = time.monotonic()
    code = watched.wait(EXIT_WAIT_S if delivered else RUN_TIMEOUT_S)
    return Interrupted(delivered, code, time.monotonic() - sent, at_s, has_traceback(watched.text()))


def rerun_problems(probe: Probe, folder: Path, reference: Reference) -> list[str]:
    """Rerun the same command to its end; what is wrong with the study afterwards."""
    done = run_harness(study_args(folder, folder / f"{STUDY}.yaml", progress=False), folder, probe.env())
    (folder / "rerun.log").write_text(done.stdout + done.stderr)
    problems = [] if done.code == 0 else [f"rerun exit code {done.code}: {one_line(done.stderr[-300:], 200)}"]
    if has_traceback(done.stdout + done.stderr):
        problems.append("traceback in the rerun's output")
    return problems + store_checks.study_problems(folder / "mlruns" / "mlflow.db", STUDY, CELLS, reference.figures)


def code_meaning(signum: int, code: int | None) -> str:
    if signum == signal.SIGKILL:
        return "killed" if code == -signum else "ended before the kill"
    if code == 128 + signum:
        return "the harness's handler"
    if code == -signum:
        return f"died of the signal (a shell shows {128 + signum}): before the CLI's handler or at interpreter exit"
    return (
        {0: "the study was done: no safe point left", 2: "bad input"}.get(code, "unexpected")
        if code is not None
        else ""
    )


def signal_problems(signum: int, got: Interrupted, folder: Path) -> list[str]:
    """Right after a SIGTERM/SIGINT: the exit code, how fast, and no run left RUNNING."""
    problems = []
    if got.code is None:
        problems.append(f"still running {EXIT_WAIT_S:.0f} s after the signal (SIGKILLed)")
    elif got.code not in (128 + signum, 2, 0, -signum):
        problems.append(f"exit code {got.code}")
    left = store_checks.open_runs(folder / "mlruns" / "mlflow.db", STUDY)
    if left:
        problems.append(f"left open right after exiting: {', '.join(left)}")
    return problems


def run_case(probe: Probe, part: str, name: str, signum: int, moment: Moment, reference: Reference) -> CaseResult:
    """One interruption and rerun; a moment the process outlived is tried once more, sooner."""
    started = time.monotonic()
    folder = probe.folder(part, name)
    got = interrupt(probe, folder, signum, moment)
    if not got.delivered:
        moment = moment.sooner()
        folder = probe.folder(part, f"{name}-sooner")
        got = interrupt(probe, folder, signum, moment)
    sig = signal.Signals(signum).name
    detail = f"{sig} {moment.label()} (sent at {got.at_s:.1f} s): exit {got.code}"
    if not got.delivered:
        detail += ", not delivered: the run had ended"
        return CaseResult(part, name, False, "inconclusive: the signal never landed", detail, False, folder=folder)
    detail += f" after {got.exit_s:.1f} s ({code_meaning(signum, got.code)})"
    detail += ", traceback in its output" if got.traceback else ""
    detail += f"; before the rerun: {store_checks.state(folder / 'mlruns' / 'mlflow.db', STUDY)}"
    problems = [] if signum == signal.SIGKILL else signal_problems(signum, got, folder)
    problems += rerun_problems(probe, folder, reference)
    result = CaseResult(part, name, not problems, "; ".join(problems), detail, folder=folder, exit_code=got.code)
    result.seconds = time.monotonic() - started
    return result
