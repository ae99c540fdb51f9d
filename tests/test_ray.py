"""Studies on Ray: local multi-node clusters the tests start themselves (fake GPUs), and the real CLI.

``ray.cluster_utils.Cluster`` runs a head and worker nodes in this process's session; every test
stops what it started. Usage statistics are off.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.attempt import AttemptSink, AttemptSuperseded, new_attempt
from harness.config import SpecError, load_spec
from harness.metric_names import TRAIN_LOSS
from harness.runs import TrialRun
from harness.study.driver import run_study
from tests.conftest import free_port
from tests.studies import tiny_spec
from tests.workers import REPO, harness_env, wait_for

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def test_a_superseded_attempt_stops_at_its_next_log_step(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("attempts")).info.run_id
    sink = AttemptSink(client, run_id, None, new_attempt(client, run_id), check_every_s=0.0)
    sink.log_metrics({"loss": 1.0}, 1)
    new_attempt(client, run_id)  # Ray retried the cell elsewhere
    with pytest.raises(AttemptSuperseded):
        sink.log_metrics({"loss": 0.9}, 2)
    sink.flush()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]


def test_a_lost_attempt_never_ends_the_newer_attempt_s_run(tmp_path: Path) -> None:
    """Issue 33: the lost attempt checked ownership only while logging; ending the run it did not check."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("lost")).info.run_id
    lost = TrialRun(AttemptSink(client, run_id, None, new_attempt(client, run_id), check_every_s=3600.0))
    new_attempt(client, run_id)  # Ray retried the cell elsewhere; the lost attempt has not logged since
    with pytest.raises(AttemptSuperseded):
        lost.finish({"test_loss": 9.9}, {})
    assert lost.fail(RuntimeError("the lost attempt's own failure")).status == "FAILED"
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and "test_loss" not in run.data.metrics  # the newer attempt's, untouched


@pytest.fixture
def cluster() -> Iterator:
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the tests' shared cluster (conftest.shared_ray), when an earlier test started it
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        yield cluster
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def trial_runs(uri: str, study: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    return [] if experiment is None else client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'trial'")


def most_at_once(uri: str, runs: list) -> int:
    """The most trials that were training at the same moment (from their first and last step's timestamps)."""
    events = []
    for run in runs:
        history = MlflowClient(uri).get_metric_history(run.info.run_id, TRAIN_LOSS)
        events += [(min(m.timestamp for m in history), 1), (max(m.timestamp for m in history), -1)]
    running = peak = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_six_cells_on_two_gpu_nodes_each_finish_once(cluster, tmp_path: Path) -> None:
    from harness.engine.ray_study import guard_study

    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    path = tiny_spec(tmp_path, "six", ["baseline", "switch", "dense"], [0, 1], budget={"tokens": 24 * 128})
    spec, uri = load_spec(path), f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    too_big = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus_per_trial": 2})})
    with pytest.raises(SpecError, match="gpus_per_trial=2 but no node"):
        run_study(too_big, uri, ray=cluster.address, progress=False, checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "mlruns").exists()  # refused before anything was written
    guard = guard_study(spec.name, uri)  # another driver holds the study
    with pytest.raises(SpecError, match="already has a driver on this Ray cluster"):
        run_study(spec, uri, ray=cluster.address, progress=False, checkpoint_dir=tmp_path / "ck")
    import ray

    ray.kill(guard)
    wait_for(lambda: not ray.util.list_named_actors(all_namespaces=True), 30, "the guard to go")
    outcome = run_study(spec, uri, ray=cluster.address, progress=False, checkpoint_dir=tmp_path / "ck")
    assert len(outcome.finished) == 6 and not outcome.failed
    runs = trial_runs(uri, "six")
    assert Counter(r.data.tags["harness.cell"] for r in runs) == {c: 1 for c in outcome.finished}
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert most_at_once(uri, runs) <= 2  # one fake GPU per node, one GPU per trial


@pytest.mark.slow
def test_a_lost_node_s_cell_resumes_on_another_node_into_the_same_run(cluster, tmp_path: Path) -> None:
    victim = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    path = tiny_spec(tmp_path, "lost", ["switch"], [0], budget={"tokens": 300 * 128, "checkpoint_every_steps": 5})
    spec, uri = load_spec(path), f"sqlite:///{tmp_path / 'ray' / 'mlflow.db'}"
    result = {}
    ray_options = {"ray": cluster.address, "progress": False, "checkpoint_dir": tmp_path / "ck"}
    driver = threading.Thread(target=lambda: result.update(outcome=run_study(spec, uri, **ray_options)))
    driver.start()
    wait_for(lambda: any((tmp_path / "ck" / "lost").glob("*.pt")), 300, "the first checkpoint", 0.1)
    cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.remove_node(victim, allow_graceful=False)  # no warning: its raylet and workers die
    driver.join(timeout=600)
    assert result["outcome"].finished == ["switch/seed=0"], result
    (run,) = trial_runs(uri, "lost")
    whole = f"sqlite:///{tmp_path / 'whole' / 'mlflow.db'}"  # uninterrupted, also as a Ray task (same threads)
    run_study(spec, whole, ray=cluster.address, progress=False, checkpoint_dir=tmp_path / "ck-whole")
    (reference,) = trial_runs(whole, "lost")
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, TRAIN_LOSS)]
    assert steps == sorted(set(steps)) and len(steps) == 150  # resumed: no step twice, none lost
    final = {k: v for k, v in run.data.metrics.items() if "loss" in k or "ppl" in k}
    assert final == {k: reference.data.metrics[k] for k in final}  # == on CPU


def harness(spec: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "harness", "run-study", str(spec), "--no-progress", *args]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_sigkilled_driver_s_rerun_skips_finished_cells_and_resumes_the_rest(cluster, tmp_path: Path) -> None:
    import ray

    cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    budget = {"tokens": 80 * 128, "checkpoint_every_steps": 5}
    spec = tiny_spec(tmp_path, "rerun", ["dense", "switch", "baseline"], [0], budget=budget)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = ["--ray", cluster.address, "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck")]
    first = harness(spec, *args, env=harness_env())
    finished = lambda: [r for r in trial_runs(uri, "rerun") if r.info.status == "FINISHED"]  # noqa: E731
    try:
        checkpoint = lambda: first.poll() is not None or any((tmp_path / "ck" / "rerun").glob("*.pt"))  # noqa: E731
        wait_for(checkpoint, 300, "a checkpoint (the store exists: reading it earlier races its migration)", 0.2)
        wait_for(lambda: first.poll() is not None or finished(), 600, "a finished cell", 0.2)
    finally:
        first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, first.stdout.read()  # killed mid-study, not ended on its own
    done_before = {r.info.run_id for r in finished()}
    wait_for(lambda: not ray.util.list_named_actors(all_namespaces=True), 60, "the dead driver's guard to go", 0.5)
    second = harness(spec, *args, env=harness_env())
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert f"{len(done_before)} already done" in out, out
    runs = trial_runs(uri, "rerun")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert done_before <= {r.info.run_id for r in runs}


@pytest.mark.slow
def test_the_cli_on_a_two_node_cluster_started_with_ray_start(tmp_path: Path) -> None:
    port = free_port()
    env = harness_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="test-token-" + "x" * 24, RAY_USAGE_STATS_ENABLED="0")
    ray = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1"]
    nodes = [subprocess.Popen([*ray, "--head", "--port", str(port), "--num-cpus", "1", "--num-gpus", "1"], env=env)]
    try:
        wait_for(lambda: _answers(port), 120, "the head node", 0.5)
        nodes.append(
            subprocess.Popen([*ray, "--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--num-gpus", "1"], env=env)
        )
        spec = tiny_spec(tmp_path, "cli", ["dense", "switch"], [0], budget={"tokens": 16 * 128})
        uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
        args = ["--ray", f"127.0.0.1:{port}", "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "ck")]
        out, _ = harness(spec, *args, env=env).communicate(timeout=400)
        assert "2 finished, 0 already done, 0 failed" in out, out
        assert {r.info.status for r in trial_runs(uri, "cli")} == {"FINISHED"}
    finally:
        for node in reversed(nodes):  # --block: stopping the command stops the node's processes
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=60)


def _answers(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
