"""Several workers, one study, a real PostgreSQL and a real MLflow server: every cell exactly once."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from mlflow.tracking import MlflowClient

from harness.coordination import FINISHED, Coordinator, claims
from harness.metric_names import TRAIN_LOSS
from tests.conftest import free_port, fresh_database
from tests.workers import mlflow_server as serve_mlflow
from tests.workers import start_worker, study_spec, wait_for


@pytest.fixture
def storage_db(postgres_server: str) -> str:
    """A second fresh database: the workers' claims live apart from MLflow's tables, as in docker-compose."""
    return fresh_database(postgres_server, "claims")


@pytest.fixture
def mlflow_server(postgres_db: str, tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on loopback with the PostgreSQL backend and served artifacts."""
    artifacts = ["--artifacts-destination", str(tmp_path / "artifacts")]
    with serve_mlflow(postgres_db, tmp_path / "mlflow-server.log", free_port(), *artifacts) as url:
        yield url


def test_concurrent_claims_hand_out_every_cell_exactly_once(storage_db: str) -> None:
    cells = [f"cell-{i}" for i in range(40)]
    coordinators = [Coordinator(storage_db, heartbeat_timeout=30) for _ in range(4)]
    coordinators[0].setup()
    taken: list[str] = []

    def work(coordinator: Coordinator) -> None:
        coordinator.setup()
        coordinator.register("race", cells)
        while (claim := coordinator.claim("race", cells)) is not None:
            taken.append(claim.cell)
            assert coordinator.complete(claim, FINISHED)

    threads = [threading.Thread(target=work, args=(c,)) for c in coordinators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == sorted(cells)
    states = coordinators[0].states("race", cells)
    assert {state for state, _ in states.values()} == {FINISHED}


def claim_rows(storage: str) -> list[sa.Row]:
    engine = sa.create_engine(storage)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(claims)).all()
    finally:
        engine.dispose()


@pytest.mark.slow
def test_three_workers_run_every_cell_once_even_when_one_is_killed(
    mlflow_server: str, storage_db: str, tmp_path: Path
) -> None:
    variants, seeds = ["baseline", "switch", "hybrid"], [0, 1]
    spec = study_spec(
        tmp_path, "fleet", variants, seeds, tokens=40 * 128, checkpoint_every_steps=4, eval_every_steps=10
    )
    ck_dir = tmp_path / "ck"  # shared, like a volume: the cell a dead worker held resumes from its checkpoint
    args = ["--tracking-uri", mlflow_server, "--storage", storage_db, "--checkpoint-dir", str(ck_dir)]
    args += ["--heartbeat-timeout", "6"]
    log = tmp_path / "workers.log"
    # The victim poses as another machine, so its cell is freed by the heartbeat timeout.
    victim = start_worker(spec, log, *args, HARNESS_WORKER_NAME="victim-host")
    survivors = [start_worker(spec, log, *args) for _ in range(2)]

    def victim_mid_trial() -> str | None:
        if victim.poll() is not None:
            raise AssertionError(f"victim exited early:\n{log.read_text()[-3000:]}")
        for row in claim_rows(storage_db) if _claims_exist(storage_db) else []:
            checkpoint = ck_dir / "fleet" / f"{row.cell.replace('/', '-')}.pt"
            if row.state == "running" and row.worker.startswith("victim-host:") and checkpoint.is_file():
                return row.cell
        return None

    cell = wait_for(victim_mid_trial, 300, "the victim to checkpoint a trial", 0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    for worker in survivors:
        assert worker.wait(timeout=600) == 0, log.read_text()[-5000:]

    rows = {row.cell: row for row in claim_rows(storage_db)}
    assert len(rows) == 6 and {row.state for row in rows.values()} == {"finished"}
    assert rows[cell].attempt == 2 and not rows[cell].worker.startswith("victim-host:")

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("fleet")
    runs = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'trial'")
    per_cell = Counter(run.data.tags["harness.cell"] for run in runs)
    assert per_cell == {f"{v}/seed={s}": 1 for v in variants for s in seeds}, per_cell  # no duplicates
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert len(client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'study'")) == 1
    taken_over = next(run for run in runs if run.data.tags["harness.cell"] == cell)
    assert taken_over.info.run_id == rows[cell].run_id
    steps = [m.step for m in client.get_metric_history(taken_over.info.run_id, TRAIN_LOSS)]
    assert steps == sorted(set(steps)) and len(steps) == 20  # resumed: no step logged twice, none lost


def _claims_exist(storage: str) -> bool:
    engine = sa.create_engine(storage)
    try:
        return sa.inspect(engine).has_table("harness_claims")
    finally:
        engine.dispose()


@pytest.mark.slow
def test_sigterm_releases_the_claim_at_once(tmp_path: Path) -> None:
    spec = study_spec(tmp_path, "term", ["dense"], [0], tokens=20_000 * 128)  # long: SIGTERM lands mid-trial
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    log = tmp_path / "worker.log"
    worker = start_worker(spec, log, "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck"))
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'coordination.db'}"
    wait_for(
        lambda: (
            (tmp_path / "mlruns" / "coordination.db").is_file()
            and _claims_exist(storage)
            and any(r.state == "running" and r.run_id for r in claim_rows(storage))
        ),
        300,
        "the trial to start",
        0.2,
    )
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 130, log.read_text()
    (row,) = claim_rows(storage)
    assert row.state == "pending" and row.worker is None
    run = MlflowClient(uri).get_run(row.run_id)
    assert run.info.status == "KILLED"
