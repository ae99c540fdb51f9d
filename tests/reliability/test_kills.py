"""``kill -9`` on ``harness run-study`` (during the store's creation, or at a random moment) and on ``harness tune``
(random moments), each followed by a rerun of the same command that must complete cleanly: the study with the
uninterrupted run's figures, the tune with every trial COMPLETE; nothing left open, no step logged twice."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability import stores
from tests.reliability.interruptions import EARLIEST_S, EXIT_WAIT_S, Moment, Reference, draw, interrupt_and_rerun
from tests.reliability.processes import RUN_TIMEOUT_S, Watched, has_traceback, one_line, run_harness, sqlite_uri
from tests.studies import tune_spec

pytestmark = pytest.mark.reliability

STUDY_PLAN = {"store": 3, "random": 13}
TUNE_CASES = 5
TUNE = "tunekill"
TUNE_SETTINGS = {"n_trials": 2, "pruner": "none", "seeds": [0]}  # no pruner: every trial that runs ends COMPLETE


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    rng = random.Random(f"{metafunc.config.getoption('reliability_seed')}-kill")
    moments = draw(rng, STUDY_PLAN)
    shares = [rng.random() for _ in range(TUNE_CASES)]
    if "moment" in metafunc.fixturenames:
        metafunc.parametrize("moment", moments, ids=[f"run-study-{i:02d}-{m.kind}" for i, m in enumerate(moments)])
    if "share" in metafunc.fixturenames:
        metafunc.parametrize("share", shares, ids=[f"tune-{i}" for i in range(TUNE_CASES)])


def tune_args(folder: Path, progress: bool) -> list[str]:
    """``tune`` of the tiny tune spec (written in ``folder``) into ``folder``'s store; Optuna's storage beside it."""
    spec = tune_spec(folder, TUNE, TUNE_SETTINGS, tokens=1000)
    args = ["tune", str(spec), "--tracking-uri", sqlite_uri(folder / "mlruns" / "mlflow.db")]
    return [*args, *([] if progress else ["--no-progress"])]


def tune_problems(folder: Path) -> list[str]:
    database, storage = folder / "mlruns" / "mlflow.db", sqlite_uri(folder / "mlruns" / "optuna" / f"{TUNE}.db")
    if not database.is_file():
        return ["no MLflow store"]
    return stores.tune_problems(database, storage, TUNE, TUNE_SETTINGS["n_trials"])


@pytest.fixture(scope="module")
def tune_seconds(tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str]) -> float:
    """An uninterrupted tiny tune: its wall time spans the random moments."""
    folder = tmp_path_factory.mktemp("tune-reference")
    done = run_harness(tune_args(folder, progress=False), folder, cli_env)
    problems = tune_problems(folder)
    assert done.code == 0 and not problems, f"tune reference: exit {done.code}, {problems}: {done.stderr[-2000:]}"
    return done.seconds


def kill_tune(folder: Path, env: dict[str, str], delay: float) -> tuple[bool, int | None]:
    """Start the tiny tune in ``folder``, SIGKILL it at ``delay`` s: delivered?, its exit code."""
    folder.mkdir(parents=True)
    watched = Watched(tune_args(folder, progress=True), folder, env, folder / "first.log")
    watched.wait_until(lambda: watched.elapsed() >= delay, RUN_TIMEOUT_S)
    delivered = watched.send(signal.SIGKILL)
    return delivered, watched.wait(EXIT_WAIT_S if delivered else RUN_TIMEOUT_S)


def test_a_killed_study_reruns_to_the_uninterrupted_figures(
    moment: Moment, tmp_path: Path, cli_env: dict[str, str], reference: Reference
) -> None:
    _, failure = interrupt_and_rerun(tmp_path, cli_env, signal.SIGKILL, moment, reference)
    assert not failure, failure


def test_a_killed_tune_reruns_to_complete_trials(
    share: float,
    tmp_path: Path,
    cli_env: dict[str, str],
    tune_seconds: float,
    record_property: Callable[[str, object], None],
) -> None:
    delay, where = EARLIEST_S + share * (tune_seconds - EARLIEST_S), tmp_path / "first"
    delivered, code = kill_tune(where, cli_env, delay)
    if not delivered:  # the tune outlived the moment: once more, sooner
        delay, where = delay / 2, tmp_path / "sooner"
        delivered, code = kill_tune(where, cli_env, delay)
    detail = f"SIGKILL at {delay:.2f} s: exit {code}"
    if not delivered:
        pytest.skip(f"inconclusive, the tune had ended: {detail}")
    detail += f"; before the rerun: {stores.state(where / 'mlruns' / 'mlflow.db', TUNE)}"
    record_property("the killed tune left runs open", bool(stores.open_runs(where / "mlruns" / "mlflow.db", TUNE)))
    done = run_harness(tune_args(where, progress=False), where, cli_env)
    (where / "rerun.log").write_text(done.stdout + done.stderr)
    problems = [] if done.code == 0 else [f"rerun exit code {done.code}: {one_line(done.stderr[-300:], 200)}"]
    problems += ["traceback in the rerun's output"] if has_traceback(done.stdout + done.stderr) else []
    problems += tune_problems(where)
    assert not problems, f"{detail}: {'; '.join(problems)} (logs in {where})"
