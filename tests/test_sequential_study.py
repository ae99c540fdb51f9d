"""A real tiny sequential study: seeds come in rounds, a clearly worse variant stops early while the others go on,
a driver SIGKILLed between rounds is rerun into the same round with nothing run twice, ``--ray local`` reaches the
same decisions, and the report has its "Design and decisions" section.

Two variants against ``dense`` on the tests' tiny data: ``small`` (d_model 8: 15-34% worse per seed, decided at its
second look, 3 seeds), and ``near`` (learning rate 0.009 instead of 0.01: 2-3.5% worse, decided later). 16,000
tokens at lr 1e-2, so every trial leaves the unigram plateau (a stalled trial would count as no seed; d_model 4
stalls)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.tags import CELL, DECISION, HEALTH, TRIALS_SAVED
from tests.studies import run_study, tiny_config, with_keys, write_spec
from tests.workers import REPO, harness_env, wait_for

STUDY = "rounds"
VARIANTS = ["dense", "small", "near"]


def sequential_spec(folder: Path) -> Path:
    spec = tiny_config(STUDY, ["dense"], budget={"tokens": 16000, "checkpoint_every_steps": 20}, optim={"lr": 1e-2})
    spec = with_keys(
        spec,
        {
            "variants.small.preset": "dense",
            "overrides.small.model.d_model": 8,
            "variants.near.preset": "dense",
            "overrides.near.optim.lr": 0.009,
        },
    )
    spec["matrix"] = {"variants": VARIANTS, "seeds": {"initial": [1, 2], "max": 5}}
    spec["design"] = {"reference": "dense"}
    return write_spec(folder / f"{STUDY}.yaml", spec)


def trials(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(STUDY)
    return [] if experiment is None else client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'trial'")


def study_run(uri: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(STUDY).experiment_id
    (parent,) = client.search_runs([experiment], "tags.`harness.role` = 'study'")
    return parent


def decisions(uri: str) -> dict[str, tuple[str, int, str]]:
    """variant -> (difference, paired seeds when the last question was decided or the study stopped, the
    non-inferiority decision), from the study run's tag (``near:worse@4/non-inferior@3,...``)."""
    found = {}
    for part in study_run(uri).data.tags[DECISION].split(","):
        variant, questions = part.split(":")
        (difference, at), (margin, margin_at) = (q.split("@") for q in questions.split("/"))
        found[variant] = (difference, max(int(at), int(margin_at)), margin)
    return found


def seeds_run(uri: str) -> dict[str, set[int]]:
    ran: dict[str, set[int]] = {}
    for run in trials(uri):
        ran.setdefault(run.data.tags["variant"], set()).add(int(run.data.tags["seed"]))
    return ran


def kill_between_rounds(spec: Path, uri: str, checkpoints: Path) -> dict[str, tuple[str, int]]:
    """Run the study in a subprocess and SIGKILL it once the second round's runs exist; the first round's runs."""
    args = ["--tracking-uri", uri, "--checkpoint-dir", str(checkpoints), "--no-progress"]
    command = [sys.executable, "-m", "harness", "run-study", str(spec), *args]
    driver = subprocess.Popen(command, env=harness_env(), cwd=REPO)
    try:  # read the store only once a checkpoint exists: earlier reads race its creation
        wait_for(lambda: driver.poll() is not None or any(checkpoints.rglob("*.pt")), 300, "a checkpoint", 0.2)
        wait_for(lambda: driver.poll() is not None or len(trials(uri)) > 6, 300, "the second round's runs", 0.1)
    finally:
        driver.send_signal(signal.SIGKILL)
    assert driver.wait() == -signal.SIGKILL, "the study ended before its second round"
    first = [run for run in trials(uri) if int(run.data.tags["seed"]) in (1, 2)]
    assert len(first) == 6 and {run.info.status for run in first} == {"FINISHED"}
    return {run.data.tags[CELL]: (run.info.run_id, run.info.end_time) for run in first}


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")  # on Ray, not about a cluster's life
def test_rounds_stop_a_worse_variant_early_survive_a_kill_and_agree_with_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = sequential_spec(tmp_path)
    assert main(["run-study", str(spec), "--dry-run"]) == 0
    assert "look  seeds" in capsys.readouterr().out
    uri = f"sqlite:///{tmp_path / 'in-process.db'}"
    assert main(["run-study", str(spec), "--list-cells", "--tracking-uri", uri]) == 0
    assert "(6 needed by the current round, marked *)" in capsys.readouterr().out  # seeds 1, 2 of every variant

    first_round = kill_between_rounds(spec, uri, tmp_path / "ck")
    assert run_study(tmp_path, spec, uri) == 0  # the rerun goes on with the round the kill stopped
    runs = trials(uri)
    assert sorted(run.data.tags[CELL] for run in runs) == sorted({run.data.tags[CELL] for run in runs})  # once each
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.tags.get(HEALTH) for run in runs} == {"ok"}
    again = {run.data.tags[CELL]: (run.info.run_id, run.info.end_time) for run in runs}
    assert {cell: again[cell] for cell in first_round} == first_round  # the first round was not run again

    decided = decisions(uri)
    assert decided["small"][::2] == ("worse", "inferior") and decided["small"][1] < 5  # stopped early ...
    assert decided["near"][1] > decided["small"][1]  # ... while near went on
    ran = seeds_run(uri)
    for variant in ("small", "near"):  # no seed after a decision
        assert ran[variant] == set(range(1, decided[variant][1] + 1))
    assert ran["dense"] == set(range(1, max(at for _, at, _ in decided.values()) + 1))
    parent = study_run(uri)
    assert parent.info.status == "FINISHED"
    assert int(parent.data.tags[TRIALS_SAVED]) == 3 * 5 - len(runs)

    capsys.readouterr()
    assert run_study(tmp_path, spec, uri) == 0  # a rerun of a decided study runs nothing
    assert "0 finished" in capsys.readouterr().out and len(trials(uri)) == len(runs)

    ray_uri = f"sqlite:///{tmp_path / 'ray.db'}"
    assert run_study(tmp_path / "ray", spec, ray_uri, "--ray", "local") == 0
    assert decisions(ray_uri) == decided and seeds_run(ray_uri) == ran

    out = tmp_path / "report"
    assert main(["report", STUDY, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    section = (out / "report.md").read_text().split("## Design and decisions")[1]
    assert "small" in section and "worse" in section and "Not counted as seeds** (failed" in section
