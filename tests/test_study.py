"""A real tiny study through the CLI into a real MLflow store, and what lands there."""

import math
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.metric_names import TRAIN_LOSS, VAL_PPL, VAL_SUBSET_PPL
from tests.conftest import harness_environment
from tests.studies import run_study, tiny_spec, trial_runs


@pytest.fixture(scope="module")
def lstm_study(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, shared_cache: Path) -> tuple[str, Path]:
    tmp_path = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    with harness_environment(tiny_data, shared_cache):
        spec = tiny_spec(tmp_path, "e2e", ["baseline", "switch", "lora", "hybrid", "dense"], [0, 1])
        assert run_study(tmp_path, spec, uri) == 0
    return uri, spec


def test_one_nested_run_per_variant_and_seed_with_tags_and_params(lstm_study: tuple[str, Path]) -> None:
    uri, _ = lstm_study
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("e2e")
    parents = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'study'")
    assert len(parents) == 1
    runs = trial_runs(uri, "e2e")
    assert len(runs) == 10
    assert set(zip(runs["tags.variant"], runs["tags.seed"], strict=True)) == {
        (v, s) for v in ["baseline", "switch", "lora", "hybrid", "dense"] for s in ["0", "1"]
    }
    assert (runs["status"] == "FINISHED").all()
    assert (runs["tags.mlflow.parentRunId"] == parents[0].info.run_id).all()
    assert (runs["tags.backbone"] == "lstm").all()
    assert runs["tags.git_commit"].notna().all() and runs["tags.device"].str.startswith("cpu").all()
    hybrid = runs[runs["tags.variant"] == "hybrid"].iloc[0]
    assert hybrid["params.moe.router"] == "switch" and hybrid["params.moe.expert"] == "lora"
    assert hybrid["params.moe.top_k"] == "1" and hybrid["params.moe.lora_rank"] == "4"
    switch = runs[runs["tags.variant"] == "switch"].iloc[0]  # MLP experts read no LoRA key: none is logged
    assert switch["params.moe.expert"] == "mlp" and pd.isna(switch.get("params.moe.lora_rank"))


def test_summary_metrics_are_present_and_finite(lstm_study: tuple[str, Path]) -> None:
    runs = trial_runs(lstm_study[0], "e2e")
    required = [
        "final_val_loss",
        "final_val_ppl",
        "best_val_subset_ppl",
        "test_loss",
        "test_ppl",
        "time_per_mtok_s",
        "train_tokens_per_s",
        "train_time_s",
        "params_total",
        "params_trainable",
        "params_active",
        "peak_rss_mb",
    ]
    for name in required:
        values = runs[f"metrics.{name}"]
        assert values.notna().all() and values.map(math.isfinite).all(), name
    assert (runs["metrics.test_ppl"] < 4000).all()  # learned something: the capped vocab has 2000 types
    assert (runs["metrics.params_active"] <= runs["metrics.params_total"]).all()
    lora = runs[runs["tags.variant"] == "lora"]
    assert (lora["metrics.params_trainable"] < lora["metrics.params_total"]).all()  # frozen shared base
    # No GPU here: GPU memory is recorded as no value, never 0.
    assert "metrics.gpu_mem_peak_nvml_mb" not in runs or runs["metrics.gpu_mem_peak_nvml_mb"].isna().all()
    moe = runs[runs["tags.variant"] != "dense"]
    assert moe["metrics.util_val_cv_l0"].notna().all()
    # Per-expert shares are in utilisation.csv, not single-value metrics; no capacity, so no dropped fraction.
    assert not [c for c in runs.columns if re.fullmatch(r"metrics\.util_\w+_e\d+", c) or "dropped" in c]
    assert "metrics.best_val_ppl" not in runs  # the best is over the eval_tokens subset only, and named so


def test_step_metrics_artifacts_and_dataset_input(lstm_study: tuple[str, Path]) -> None:
    uri, _ = lstm_study
    client = MlflowClient(uri)
    run_id = trial_runs(uri, "e2e").query("`tags.variant` == 'baseline'")["run_id"].iloc[0]
    history = client.get_metric_history(run_id, TRAIN_LOSS)
    assert len(history) >= 3 and all(math.isfinite(m.value) for m in history)
    assert [m.step for m in history] == sorted(m.step for m in history)
    val_full = client.get_metric_history(run_id, VAL_PPL)
    val_subset = client.get_metric_history(run_id, VAL_SUBSET_PPL)
    assert not val_full  # the full split after training is a summary figure (final_val_ppl), not a lone point
    assert val_subset and max(m.step for m in val_subset) == history[-1].step  # the estimate's curve ends at the end
    for name in ["aux_loss", "lr", "tokens_per_s", "balance_cv2", "balance_switch", "z"]:
        assert client.get_metric_history(run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "utilisation.csv", "utilisation_history.csv"} <= artifacts
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="utilisation.csv"))
    assert set(table["split"]) == {"train", "validation"} and set(table["expert"]) == {0, 1, 2, 3}
    assert (table.groupby(["split", "layer"])["share"].sum() - 1.0).abs().max() < 1e-5
    config = yaml.safe_load(
        Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml")).read_text()
    )
    assert config["variant"] == "baseline" and config["moe"]["router"] == "noisy_topk"
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "wikitext-2-v1" and inputs[0].dataset.digest


def test_rerun_skips_finished_cells_and_creates_no_new_runs(
    lstm_study: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, spec = lstm_study
    before = set(trial_runs(uri, "e2e")["run_id"])
    assert run_study(tmp_path, spec, uri) == 0
    assert "0 finished, 10 already done, 0 failed" in capsys.readouterr().out
    assert set(trial_runs(uri, "e2e")["run_id"]) == before


def test_same_seed_gives_identical_losses(lstm_study: tuple[str, Path], tmp_path: Path) -> None:
    uri, _ = lstm_study
    other = f"sqlite:///{tmp_path / 'again' / 'mlflow.db'}"
    assert run_study(tmp_path, tiny_spec(tmp_path, "e2e", ["baseline"], [0]), other) == 0
    first = trial_runs(uri, "e2e").query("`tags.variant` == 'baseline' and `tags.seed` == '0'").iloc[0]
    second = trial_runs(other, "e2e").iloc[0]
    assert first["metrics.test_loss"] == second["metrics.test_loss"]
    assert first["metrics.final_val_loss"] == second["metrics.final_val_loss"]


@pytest.mark.slow
def test_gpt_backbone_runs_every_variant_through_the_same_trainer(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_spec(
        tmp_path,
        "gpt",
        ["baseline", "switch", "lora", "hybrid", "dense"],
        [0],
        model={"backbone": "gpt", "n_layers": 2, "n_heads": 2, "moe_every": 1},
    )
    assert run_study(tmp_path, spec, uri) == 0
    runs = trial_runs(uri, "gpt")
    assert len(runs) == 5 and (runs["tags.backbone"] == "gpt").all()
    moe = runs[runs["tags.variant"] != "dense"]
    assert moe["metrics.util_train_cv_l1"].notna().all()  # utilisation per MoE layer: two layers
