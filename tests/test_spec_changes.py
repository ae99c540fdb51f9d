"""A rerun of an edited spec never counts an old result as done: refused in one line, or superseded on request."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.relocate import relocate
from harness.report.gather import load_study
from harness.runs import finish_study_run
from harness.tags import FINGERPRINT, HEALTH, PARENT, ROLE, ROLE_TRIAL, SUPERSEDED
from harness.tracking import TrackingStore
from tests.conftest import harness_environment
from tests.studies import run_study, tiny_spec

STUDY = "edited"


def store_bytes(uri: str) -> str:
    return hashlib.sha256(Path(uri.removeprefix("sqlite:///")).read_bytes()).hexdigest()


def edit(spec: Path, dotted: str, value: object) -> None:
    tree = yaml.safe_load(spec.read_text())
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    spec.write_text(yaml.safe_dump(tree))


def runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(STUDY)
    return client.search_runs([experiment.experiment_id], f"tags.`{ROLE}` != 'study'")


def refused_line(tmp_path: Path, spec: Path, uri: str, capsys: pytest.CaptureFixture, *extra: str) -> str:
    """Rerun ``spec``: exit 2, the store byte-identical; the one line on stderr."""
    before = store_bytes(uri)
    capsys.readouterr()
    assert run_study(tmp_path, spec, uri, *extra) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert store_bytes(uri) == before
    return lines[0]


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, shared_cache: Path) -> Path:
    """The two-cell study, run once for the module: its folder (spec, embedded store)."""
    folder = tmp_path_factory.mktemp("finished")
    with harness_environment(tiny_data, shared_cache):
        spec = tiny_spec(folder, STUDY, ["dense", "switch"], [0])
        assert run_study(folder, spec, f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}") == 0
    return folder


@pytest.fixture
def finished_study(tmp_path: Path, tracking_uri: str, finished_once: Path) -> Path:
    """A copy of the finished study at ``tracking_uri``, relocated (``harness store relocate``): its spec's path."""
    store = Path(tracking_uri.removeprefix("sqlite:///")).parent
    shutil.copytree(finished_once / "mlruns", store)
    relocate(store)
    return Path(shutil.copy(finished_once / f"{STUDY}.yaml", tmp_path))


@pytest.mark.parametrize(
    ("dotted", "value", "named"),
    [
        ("base.train.batch_size", 4, "train.batch_size 8 -> 4"),
        ("base.budget.tokens", 2000, "budget.tokens 1500 -> 2000"),
        ("base.model.d_model", 16, "model.d_model 32 -> 16"),
        ("base.budget.eval_every_steps", 3, "budget.eval_every_steps 4 -> 3"),
    ],
)
def test_a_changed_key_refuses_the_rerun_in_one_line_and_writes_nothing(
    tmp_path: Path, tracking_uri: str, finished_study: Path, capsys: pytest.CaptureFixture, dotted, value, named
) -> None:
    edit(finished_study, dotted, value)
    line = refused_line(tmp_path, finished_study, tracking_uri, capsys)
    assert named in line and "study 'edited'" in line and "dense/seed=0" in line and "--supersede" in line, line


@pytest.mark.parametrize("path", ["--cell", "--ray"])
def test_every_path_refuses_a_changed_cell(
    tmp_path: Path, tracking_uri: str, finished_study: Path, capsys: pytest.CaptureFixture, path: str
) -> None:
    if path == "--ray":
        pytest.importorskip("ray")
    edit(finished_study, "base.optim.lr", 0.01)
    extra = ["--cell", "1"] if path == "--cell" else ["--ray", "local"]
    line = refused_line(tmp_path, finished_study, tracking_uri, capsys, *extra)
    assert "optim.lr 0.003 -> 0.01" in line and ("switch/seed=0" if path == "--cell" else "dense/seed=0") in line


def test_a_changed_data_file_refuses_the_rerun(
    tmp_path: Path, tracking_uri: str, finished_study: Path, tiny_data: Path, monkeypatch, capsys, shared_cache: Path
) -> None:
    changed = tmp_path / "data"
    shutil.copytree(tiny_data, changed)
    path = changed / "wikitext-2-v1" / "validation-00000-of-00001.parquet"
    table = pq.read_table(path)
    pq.write_table(pa.table({"text": table.column("text").to_pylist()[:-1]}), path)  # one line fewer
    monkeypatch.setenv("MOE_HARNESS_DATA", str(changed))
    cache = sorted(shared_cache.iterdir())
    assert "data.sha256.validation" in refused_line(tmp_path, finished_study, tracking_uri, capsys)
    assert sorted(shared_cache.iterdir()) == cache  # the changed data's tokenised cache is not written


def test_the_same_data_elsewhere_and_other_threads_count_as_done(
    tmp_path: Path, tracking_uri: str, finished_study: Path, tiny_data: Path, monkeypatch, capsys
) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(tiny_data, moved)
    monkeypatch.setenv("MOE_HARNESS_DATA", str(moved))
    edit(finished_study, "base.train.threads", 2)  # how fast, not what: the same cell
    assert run_study(tmp_path, finished_study, tracking_uri) == 0
    assert "0 finished, 2 already done" in capsys.readouterr().out


def test_supersede_runs_only_the_changed_cells_and_the_report_reads_the_new_runs(
    tmp_path: Path, tracking_uri: str, finished_study: Path
) -> None:
    old = {run.data.tags["variant"]: run for run in runs(tracking_uri)}
    edit(finished_study, "overrides.switch.optim.lr", 0.001)  # only the switch cell changes
    assert run_study(tmp_path, finished_study, tracking_uri, "--supersede") == 0
    now = runs(tracking_uri)
    superseded = [run for run in now if run.data.tags[ROLE] == "superseded"]
    trials = {run.data.tags["variant"]: run for run in now if run.data.tags[ROLE] == "trial"}
    assert [run.info.run_id for run in superseded] == [old["switch"].info.run_id]
    assert superseded[0].data.tags[SUPERSEDED] == "optim.lr 0.003 -> 0.001"
    assert trials["dense"].info.run_id == old["dense"].info.run_id  # unchanged: still done, not rerun
    assert trials["switch"].info.run_id != old["switch"].info.run_id
    assert trials["switch"].data.params["optim.lr"] == "0.001"
    assert trials["switch"].data.tags[FINGERPRINT] != old["switch"].data.tags[FINGERPRINT]
    data = load_study(STUDY, tracking_uri)
    assert sorted(data.runs["run_id"]) == sorted(run.info.run_id for run in trials.values())
    assert run_study(tmp_path, finished_study, tracking_uri) == 0  # the new runs are the cells' runs now


def test_a_changed_summary_goes_to_the_parent_run_s_next_step(tracking_uri: str) -> None:
    """A superseded cell (or any rerun) changes a variant's mean: the parent run holds one value per step."""
    store = TrackingStore(tracking_uri)
    experiment_id = store.experiment_id(STUDY)
    parent = store.client.create_run(experiment_id, tags={ROLE: "study"}).info.run_id

    def trial(ppl: float) -> None:
        tags = {PARENT: parent, ROLE: ROLE_TRIAL, "variant": "switch", HEALTH: "ok"}
        run_id = store.client.create_run(experiment_id, tags=tags).info.run_id
        store.client.log_metric(run_id, "test_ppl", ppl)
        store.client.set_terminated(run_id, "FINISHED")

    trial(100.0)
    finish_study_run(store, parent, "FINISHED")
    trial(200.0)
    finish_study_run(store, parent, "FINISHED")
    finish_study_run(store, parent, "FINISHED")  # nothing changed: nothing logged
    history = store.client.get_metric_history(parent, "mean_test_ppl_switch")
    assert [(metric.step, metric.value) for metric in history] == [(0, 100.0), (1, 150.0)]
