"""What the MLflow UI shows of a finished study, read through a real ``mlflow server``'s REST API.

The UI is a client of that API: a parent run ``FINISHED`` with an end time, the standard tags behind
the Source / Version / User columns, the experiment's description, and artifacts that list and
download, also after the store folder has been moved (and relocated by ``harness store relocate``).
What it shows must be true and agree with the report: each trial's duration is its own (in process and
on Ray), the study run's per-variant means are the report's table, references carry no MoE params or curves.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.colours import colour
from harness.relocate import recorded_store, relocate
from harness.report.gather import load_study
from tests.conftest import free_port
from tests.studies import run_study, tiny_spec
from tests.workers import mlflow_server

DESCRIPTION = "Two variants for the UI test."


def rest(url: str, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> Any:
    """A REST call as the UI makes it: GET with a query, or POST with a JSON body."""
    address = f"{url}/{endpoint}?{urllib.parse.urlencode(query)}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(address, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
    return json.loads(payload) if endpoint.startswith("api/") else payload


def study_view(url: str) -> dict[str, Any]:
    """The experiment, its runs by role, and the artifacts of the parent and of one trial."""
    experiment = rest(url, "api/2.0/mlflow/experiments/get-by-name", experiment_name="ui")["experiment"]
    runs = rest(url, "api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    by_role: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        run["tags"] = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        by_role.setdefault(run["tags"]["harness.role"], []).append(run)

    def artifacts(run: dict[str, Any]) -> set[str]:
        listing = rest(url, "api/2.0/mlflow/artifacts/list", run_id=run["info"]["run_id"])
        return {f["path"] for f in listing.get("files", [])}

    (parent,), trial = by_role["study"], by_role["trial"][0]
    return {"experiment": experiment, "parent": parent, "trials": by_role["trial"], "trial": trial} | {
        "parent_files": artifacts(parent),
        "trial_files": artifacts(trial),
    }


def check_view(url: str) -> None:
    view = study_view(url)
    tags = {t["key"]: t["value"] for t in view["experiment"].get("tags", [])}
    assert tags["mlflow.note.content"] == DESCRIPTION
    parent = view["parent"]
    assert parent["info"]["status"] == "FINISHED" and int(parent["info"]["end_time"]) > 0
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    results = {variant: metrics[f"seeds_counted_{variant}"] for variant in ("baseline", "dense")}
    means = {f"mean_test_ppl_{variant}" for variant, n in results.items() if n}  # untrained trials are no result
    assert set(metrics) == {"trials_finished", "seeds_counted_baseline", "seeds_counted_dense", *means}
    assert metrics["trials_finished"] == 2
    assert parent["tags"]["harness.health_summary"].startswith(f"{int(sum(results.values()))} ok")
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params == {"matrix.variants": "baseline,dense", "matrix.seeds": "0", "n_trials": "2"}
    assert parent["tags"]["mlflow.note.content"] == DESCRIPTION
    for run in [parent, *view["trials"]]:
        assert run["tags"]["mlflow.source.name"] == "harness" and run["tags"]["mlflow.source.type"] == "LOCAL"
        assert len(run["tags"]["mlflow.source.git.commit"]) == 40 and run["tags"]["mlflow.user"]
    assert "spec.yaml" in view["parent_files"]
    assert {"config.yaml", "utilisation.csv", "utilisation_history.csv"} <= view["trial_files"]
    spec = rest(url, "get-artifact", path="spec.yaml", run_uuid=parent["info"]["run_id"])
    assert yaml.safe_load(spec)["description"] == DESCRIPTION
    table = rest(url, "get-artifact", path="utilisation.csv", run_uuid=view["trial"]["info"]["run_id"])
    assert table.decode().startswith("split,layer,expert,share")


@pytest.mark.slow
def test_a_finished_study_as_the_ui_reads_it_before_and_after_its_store_moved(tmp_path: Path) -> None:
    spec_path = tiny_spec(tmp_path, "ui", ["baseline", "dense"], [0])
    spec = yaml.safe_load(spec_path.read_text())
    spec_path.write_text(yaml.safe_dump(spec | {"description": DESCRIPTION}))
    store = tmp_path / "here" / "mlruns"
    assert run_study(tmp_path, spec_path, f"sqlite:///{store / 'mlflow.db'}") == 0
    log = tmp_path / "server.log"

    with mlflow_server(f"sqlite:///{store / 'mlflow.db'}", log, free_port()) as url:
        check_view(url)

    moved = tmp_path / "there" / "mlruns"
    shutil.move(store, moved)
    backend = f"sqlite:///{moved / 'mlflow.db'}"
    client = MlflowClient(backend)  # the UI server lists artifacts as this client does: at the recorded place
    trial = client.search_runs([client.get_experiment_by_name("ui").experiment_id], "tags.`harness.role` = 'trial'")[0]
    assert not client.list_artifacts(trial.info.run_id)  # as MLflow recorded it: the old, absolute place
    assert main(["store", "relocate", str(moved)]) == 0
    assert relocate(moved) == 0  # a second time: nothing left to change
    with mlflow_server(backend, log, free_port()) as url:
        check_view(url)


def test_relocate_reads_the_store_a_location_was_recorded_under(tmp_path: Path) -> None:
    assert recorded_store((tmp_path / "mlruns" / "artifacts" / "quick").as_uri()) == tmp_path / "mlruns"
    assert recorded_store("mlflow-artifacts:/quick") is None
    assert recorded_store((tmp_path / "mlruns" / "0").as_uri()) is None  # not the embedded layout: left alone
    assert main(["store", "relocate", str(tmp_path)]) == 2  # no store there: one line, exit 2


def check_truthful(url: str, study: str, *, sequential_driver: bool) -> None:
    """Each trial's duration is its own, the study run's means are the report's, references carry no MoE."""
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(study).experiment_id
    trials = client.search_runs([experiment], "tags.`harness.role` = 'trial'")
    (parent,) = client.search_runs([experiment], "tags.`harness.role` = 'study'")
    for trial in trials:
        duration = (trial.info.end_time - trial.info.start_time) / 1000
        assert duration == pytest.approx(trial.data.metrics["wall_time_s"], rel=0.2), trial.data.tags["harness.cell"]
        assert trial.data.tags["mlflow.runColor"] == colour(trial.data.tags["variant"])
        curve = client.get_metric_history(trial.info.run_id, "0_val_subset_ppl")
        last = max(m.step for m in client.get_metric_history(trial.info.run_id, "0_train_loss"))
        assert max(m.step for m in curve) == last  # the validation curve ends where training ends
        assert not client.get_metric_history(trial.info.run_id, "0_val_ppl")  # the full split: a summary figure
        if trial.data.tags["variant"] in ("dense", "plain"):
            assert not client.get_metric_history(trial.info.run_id, "aux_loss")
            moe = {key for key in trial.data.params if key.startswith("moe.")}
            assert moe == ({"moe.d_hidden", "moe.activation"} if trial.data.tags["variant"] == "dense" else set())
    if sequential_driver:  # cells one after another: their durations fit inside the study's
        total = sum((t.info.end_time - t.info.start_time) / 1000 for t in trials)
        assert total <= 1.2 * (parent.info.end_time - parent.info.start_time) / 1000
    data = load_study(study, url)
    (backbone,) = data.backbones
    table = {variant: runs["metrics.test_ppl"] for variant, runs in data.per_variant(backbone)}
    assert table, "no trial trained: the comparison below would be empty"
    for variant in ("baseline", "dense", "plain"):
        assert parent.data.metrics[f"seeds_counted_{variant}"] == len(table.get(variant, []))
        if variant in table:
            assert parent.data.metrics[f"mean_test_ppl_{variant}"] == pytest.approx(table[variant].mean(), rel=1e-12)
    finished = sum(trial.info.status == "FINISHED" for trial in trials)
    assert parent.data.tags["harness.health_summary"].startswith(f"{finished - len(data.flagged)} ok")


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")  # on Ray, not about a cluster's life
def test_durations_means_and_references_agree_with_the_report_on_a_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    budget, optim = {"tokens": 16000}, {"lr": 1e-2}  # enough for the tiny data's trials to leave the unigram plateau
    variants, seeds = ["baseline", "dense", "plain"], [1, 2]
    in_process = tiny_spec(tmp_path, "truth", variants, seeds, budget=budget, optim=optim)
    on_ray = tiny_spec(tmp_path, "truth-ray", variants, seeds, budget=budget, optim=optim)
    artifacts = ("--artifacts-destination", str(tmp_path / "artifacts"))
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server.log", free_port(), *artifacts) as url:
        assert run_study(tmp_path, in_process, url) == 0
        assert f"MLflow: {url}/#/experiments/" in capsys.readouterr().out  # the Model training view's link
        check_truthful(url, "truth", sequential_driver=True)
        assert run_study(tmp_path / "ray", on_ray, url, "--ray", "local") == 0
        check_truthful(url, "truth-ray", sequential_driver=False)
