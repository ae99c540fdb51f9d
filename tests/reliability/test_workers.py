"""Workers started together on one fresh store, the two ways the README offers (a three-cell tiny study): the same
``run-study`` twice (the study lock lets one run it and refuses the other in one line, naming the holder; both
exiting 0 counts too), and three Slurm-array tasks ``run-study --cell 0|1|2`` (all exit 0 under one parent run).
Each store must then hold one FINISHED trial run per cell, nothing open, no step logged twice, and exactly one
study parent run (deleted ones counted too), FINISHED. Every round repeats the race."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability import stores
from tests.reliability.interruptions import BUDGET
from tests.reliability.processes import RUN_TIMEOUT_S, Watched, has_traceback, sqlite_uri
from tests.studies import tiny_spec

pytestmark = pytest.mark.reliability

ROUNDS = 3
STUDY = "pair"
VARIANTS = ["baseline", "switch", "dense"]
CELLS = [f"{v}/seed=0" for v in VARIANTS]
LOCK_REFUSAL = "the study is already running in process"


def start_together(folder: Path, env: dict[str, str], extra: list[list[str]]) -> list[tuple[int | None, str]]:
    """One ``run-study`` per entry of ``extra`` (its extra arguments), all started at once on ``folder``'s store:
    each one's exit code and output."""
    spec = tiny_spec(folder, STUDY, VARIANTS, budget=BUDGET)
    args = ["run-study", str(spec), "--tracking-uri", sqlite_uri(folder / "mlruns" / "mlflow.db"), "--no-progress"]
    args += ["--checkpoint-dir", str(folder / "ck")]
    started = [Watched([*args, *more], folder, env, folder / f"worker{i}.log") for i, more in enumerate(extra)]
    return [(worker.wait(RUN_TIMEOUT_S), worker.text()) for worker in started]


def refused_by_lock(code: int | None, output: str) -> bool:
    lines = [line for line in output.strip().splitlines() if line.startswith("harness: error: ")]
    return code == 2 and len(lines) == 1 and LOCK_REFUSAL in lines[0] and not has_traceback(output)


def store_problems(folder: Path) -> list[str]:
    database = folder / "mlruns" / "mlflow.db"
    problems = stores.study_problems(database, STUDY, CELLS, None)
    runs = stores.study_runs(database, STUDY, deleted=True)
    parents = [(r.info.lifecycle_stage, r.info.status) for r in runs if r.data.tags.get(stores.ROLE) == "study"]
    if parents != [("active", "FINISHED")]:
        problems.append(f"study parent runs {parents}, expected one active FINISHED")
    return problems


def worker_problems(ended: list[tuple[int | None, str]], ok: Callable[[int | None, str], bool]) -> list[str]:
    problems = [f"worker {i}: exit code {code}" for i, (code, out) in enumerate(ended) if not ok(code, out)]
    return problems + [f"worker {i}: traceback" for i, (_, out) in enumerate(ended) if has_traceback(out)]


@pytest.mark.parametrize("round_", range(ROUNDS), ids=[f"round-{i}" for i in range(ROUNDS)])
def test_the_same_study_started_twice_runs_once(
    round_: int, tmp_path: Path, cli_env: dict[str, str], record_property: Callable[[str, object], None]
) -> None:
    ended = start_together(tmp_path, cli_env, [[], []])
    codes = sorted(code for code, _ in ended)
    record_property("exit codes of the same study started twice", str(codes))
    problems = worker_problems(ended, lambda code, out: code == 0 or refused_by_lock(code, out))
    problems += [] if 0 in codes else ["neither worker ran the study"]
    problems += store_problems(tmp_path)
    assert not problems, f"{'; '.join(problems)} (logs in {tmp_path})"


@pytest.mark.parametrize("round_", range(ROUNDS), ids=[f"round-{i}" for i in range(ROUNDS)])
def test_array_tasks_started_together_share_one_parent_run(
    round_: int, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    ended = start_together(tmp_path, cli_env, [["--cell", str(i)] for i in range(len(CELLS))])
    problems = worker_problems(ended, lambda code, _: code == 0) + store_problems(tmp_path)
    assert not problems, f"{'; '.join(problems)} (logs in {tmp_path})"
