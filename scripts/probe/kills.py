"""``kill -9``: 16 cases on ``harness run-study`` (3 during the store's creation, 13 at random moments) and 5 on
``harness tune`` (random moments), each followed by a rerun of the same command that must complete cleanly."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import interrupts
import store_checks
from common import (
    RUN_TIMEOUT_S,
    CaseResult,
    Probe,
    Watched,
    has_traceback,
    one_line,
    run_harness,
    sqlite_uri,
    tune_spec,
    write_yaml,
)

STUDY_CASES, STORE_CASES, TUNE_CASES = 16, 3, 5
TUNE = "tunekill"
TUNE_TRIALS = 2


def study_moments(rng: random.Random, reference_s: float) -> list[interrupts.Moment]:
    store = [interrupts.Moment("store", rng.uniform(0.0, 0.5)) for _ in range(STORE_CASES)]
    spread = [interrupts.Moment("random", rng.uniform(0.5, reference_s)) for _ in range(STUDY_CASES - STORE_CASES)]
    return store + spread


def tune_args(folder: Path, spec: Path, progress: bool) -> list[str]:
    args = ["tune", str(spec), "--tracking-uri", sqlite_uri(folder / "mlruns" / "mlflow.db")]
    return [*args, *([] if progress else ["--no-progress"])]


def tune_storage(folder: Path) -> str:
    return sqlite_uri(folder / "mlruns" / "optuna" / f"{TUNE}.db")  # the default, beside the MLflow store


def tune_reference(probe: Probe) -> float:
    """An uninterrupted tiny tune: its wall time bounds the random moments."""
    folder = probe.folder("reference", "tune")
    spec = write_yaml(folder / f"{TUNE}.yaml", tune_spec(TUNE, TUNE_TRIALS))
    done = run_harness(tune_args(folder, spec, progress=False), folder, probe.env())
    problems = store_checks.tune_problems(folder / "mlruns" / "mlflow.db", tune_storage(folder), TUNE, TUNE_TRIALS)
    if done.code != 0 or problems:
        raise RuntimeError(f"tune reference: exit {done.code}, {problems}: {done.stderr[-2000:]}")
    return done.seconds


def kill_tune(probe: Probe, folder: Path, delay: float) -> tuple[bool, int | None]:
    """Start the tiny tune in ``folder``, SIGKILL it at ``delay`` s; delivered?, its exit code."""
    spec = write_yaml(folder / f"{TUNE}.yaml", tune_spec(TUNE, TUNE_TRIALS))
    watched = Watched(tune_args(folder, spec, progress=True), folder, probe.env(), folder / "first.log")
    watched.wait_until(lambda: watched.elapsed() >= delay, RUN_TIMEOUT_S)
    delivered = watched.send(signal.SIGKILL)
    return delivered, watched.wait(interrupts.EXIT_WAIT_S if delivered else RUN_TIMEOUT_S)


def tune_rerun_problems(probe: Probe, folder: Path) -> list[str]:
    """Rerun the same tune command: exit 0, the trials COMPLETE, no MLflow run left open."""
    done = run_harness(tune_args(folder, folder / f"{TUNE}.yaml", progress=False), folder, probe.env())
    (folder / "rerun.log").write_text(done.stdout + done.stderr)
    problems = [] if done.code == 0 else [f"rerun exit code {done.code}: {one_line(done.stderr[-300:], 200)}"]
    problems += ["traceback in the rerun's output"] if has_traceback(done.stdout + done.stderr) else []
    database = folder / "mlruns" / "mlflow.db"
    if not database.is_file():
        return [*problems, "no MLflow store after the rerun"]
    return problems + store_checks.tune_problems(database, tune_storage(folder), TUNE, TUNE_TRIALS)


def tune_case(probe: Probe, name: str, delay: float) -> CaseResult:
    """Kill a tiny tune at ``delay`` s (a moment it outlived: once more at half of it), then rerun it."""
    started = time.monotonic()
    folder = probe.folder("kill", name)
    delivered, code = kill_tune(probe, folder, delay)
    if not delivered:
        delay, folder = delay / 2, probe.folder("kill", f"{name}-sooner")
        delivered, code = kill_tune(probe, folder, delay)
    detail = f"SIGKILL at {delay:.2f} s: exit {code}"
    if not delivered:
        return CaseResult("kill", name, False, "inconclusive: the tune had ended", detail, False, folder=folder)
    detail += f"; before the rerun: {store_checks.state(folder / 'mlruns' / 'mlflow.db', TUNE)}"
    problems = tune_rerun_problems(probe, folder)
    result = CaseResult("kill", name, not problems, "; ".join(problems), detail, folder=folder)
    result.seconds = time.monotonic() - started
    return result


def run_kills(
    probe: Probe, reference: interrupts.Reference, tune_s: float, report: Callable[[CaseResult], None]
) -> list[CaseResult]:
    rng = random.Random(f"{probe.seed}-kill")
    moments = study_moments(rng, reference.seconds)
    tune_delays = [rng.uniform(0.5, tune_s) for _ in range(TUNE_CASES)]
    results = []
    for i, moment in enumerate(moments):
        name = f"run-study-{i:02d}-{moment.kind}"
        if not probe.wants(name):
            continue
        results.append(interrupts.run_case(probe, "kill", name, signal.SIGKILL, moment, reference))
        report(results[-1])
    for i, delay in enumerate(tune_delays):
        if not probe.wants(f"tune-{i}"):
            continue
        results.append(tune_case(probe, f"tune-{i}", delay))
        report(results[-1])
    return results
