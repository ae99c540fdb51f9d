"""Study specs: what is accepted, how the matrix expands, and one-line errors for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import load_spec
from harness.matrix import expand
from tests.studies import run_study, tiny_spec

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {
    "name": "t",
    "base": {"budget": {"tokens": 1000}},
    "matrix": {"variants": ["baseline", "hybrid"], "seeds": [1, 2]},
}


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def with_base(**sections: dict) -> dict:
    return {**MINIMAL, "base": {**MINIMAL["base"], **sections}}


@pytest.mark.parametrize("spec_file", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_are_valid(spec_file: Path) -> None:
    assert expand(load_spec(spec_file))


def test_matrix_expands_variants_seeds_and_sweeps_with_presets_and_overrides(tmp_path: Path) -> None:
    spec = {
        **MINIMAL,
        "matrix": {**MINIMAL["matrix"], "sweep": {"moe.n_experts": [4, 8]}},
        "overrides": {"hybrid": {"moe": {"lora_rank": 4}}},
    }
    trials = expand(load_spec(write_spec(tmp_path, spec)))
    assert len(trials) == 2 * 2 * 2
    assert len({t.key for t in trials}) == 8
    hybrid = [t for t in trials if t.variant == "hybrid"]
    assert all(t.config.moe.router == "switch" and t.config.moe.top_k == 1 for t in hybrid)
    assert all(t.config.moe.expert == "lora" and t.config.moe.lora_rank == 4 for t in hybrid)
    baseline = [t for t in trials if t.variant == "baseline"]
    assert all(t.config.moe.router == "noisy_topk" and t.config.moe.top_k == 2 for t in baseline)
    assert {t.config.moe.n_experts for t in trials} == {4, 8}
    assert {t.config.seed for t in trials} == {1, 2}


def test_cells_run_seed_major_with_each_source_moved_before_its_first_dependent(tmp_path: Path) -> None:
    spec = {
        **MINIMAL,
        "variants": {"switch_up": {"preset": "switch"}},
        "overrides": {"switch_up": {"init": {"source": "dense"}}},
        "matrix": {"variants": ["switch_up", "baseline", "dense"], "seeds": [1, 2]},
    }
    keys = [cell.key for cell in expand(load_spec(write_spec(tmp_path, spec)))]
    assert keys == [f"{v}/seed={s}" for s in (1, 2) for v in ("dense", "switch_up", "baseline")]
    spec["matrix"]["variants"] = ["dense", "switch_up", "baseline"]  # sources already first: the matrix's order
    assert [cell.key for cell in expand(load_spec(write_spec(tmp_path, spec)))] == keys


def test_dry_run_lists_every_trial(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run-study", str(write_spec(tmp_path, MINIMAL)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "baseline/seed=1" in out and "hybrid/seed=2" in out and "4 trials" in out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {**with_base(moe={"n_experts": 8}), "overrides": {"baseline": {"moe": {"top_k": 9}}}},
            "moe.top_k=9 exceeds moe.n_experts=8 (variant baseline)",
        ),
        (with_base(moe={"lora_rank": 0}), "moe.lora_rank = 0: Input should be greater than or equal to 1"),
        (
            with_base(moe={"aux_loss_coef": -0.1}),
            "moe.aux_loss_coef = -0.1: Input should be greater than or equal to 0",
        ),
        (with_base(moe={"n_expert": 4}), "unknown key 'moe.n_expert' (did you mean 'n_experts'?)"),
        (with_base(optim={"lr": "fast"}), "optim.lr = 'fast': Input should be a valid number"),
        (with_base(budget={"tokens": 10, "epochs": 1}), "budget needs exactly one of budget.epochs or budget.tokens"),
        ({**MINIMAL, "matrix": {"variants": ["mixtral"], "seeds": [1]}}, "matrix.variants.0 = 'mixtral'"),
        ({**MINIMAL, "matrx": {}}, "unknown key 'matrx' (did you mean 'matrix'?)"),
        (
            {**MINIMAL, "matrix": {"variants": ["lora"], "seeds": [1], "sweep": {"moe.rank": [2]}}},
            "unknown key 'moe.rank'",
        ),
    ],
)
def test_bad_specs_exit_2_with_one_line_naming_key_and_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: dict, message: str
) -> None:
    path = write_spec(tmp_path, spec)
    assert main(["run-study", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/db/mlflow.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err and str(path) in err
    assert not (tmp_path / "db").exists(), "nothing may be written for a bad spec"


def test_malformed_yaml_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nmatrix: [unclosed\n")
    assert main(["run-study", str(bad)]) == 2
    assert "malformed YAML at line" in capsys.readouterr().err
    assert main(["run-study", str(tmp_path / "absent.yaml")]) == 2
    assert "no such study spec" in capsys.readouterr().err


def lacking(what: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A spec that asks this machine for what it lacks: a CUDA device (``cuda``) or the data folder (``data``).
    How to run it is checked before a run (tests/test_bad_input.py), not when the spec is read."""
    if what == "cuda":
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return with_base(train={"device": "cuda"})
    monkeypatch.setenv("MOE_HARNESS_DATA", str(tmp_path / "nowhere"))
    return MINIMAL


@pytest.mark.parametrize("option", ["--dry-run", "--list-cells"])
@pytest.mark.parametrize("lacks", ["cuda", "data"])
def test_cells_are_listed_on_a_machine_without_a_gpu_or_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, lacks: str, option: str
) -> None:
    """What a Slurm user runs on a login node before submitting ``--cell N`` array tasks."""
    spec = write_spec(tmp_path, lacking(lacks, tmp_path, monkeypatch))
    assert main(["run-study", str(spec), option]) == 0
    out = capsys.readouterr().out
    assert "hybrid/seed=2" in out and "4 trials in study 't'" in out


@pytest.mark.parametrize("lacks", ["cuda", "data"])
def test_report_reads_the_spec_on_a_machine_without_a_gpu_or_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, lacks: str
) -> None:
    spec = write_spec(tmp_path, lacking(lacks, tmp_path, monkeypatch))
    database = tmp_path / "none" / "mlflow.db"
    assert main(["report", str(spec), "--tracking-uri", f"sqlite:///{database}", "--out", str(tmp_path / "r")]) == 2
    assert "no such database" in capsys.readouterr().err  # past the spec: only the store is missing


@pytest.mark.slow
def test_a_study_whose_spec_asks_for_cuda_is_reported_on_a_machine_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert run_study(tmp_path, tiny_spec(tmp_path, "anywhere", ["dense"]), uri) == 0
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = tiny_spec(tmp_path / "cuda", "anywhere", ["dense"], train={"device": "cuda"})
    assert main(["report", str(spec), "--tracking-uri", uri, "--out", str(tmp_path / "report"), "--no-log"]) == 0
    assert "anywhere" in (tmp_path / "report" / "report.md").read_text()


def test_console_entry_point_runs_as_a_module(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness", "run-study", str(write_spec(tmp_path, MINIMAL)), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "4 trials in study 't'" in result.stdout


@pytest.mark.slow
def test_a_model_that_cannot_be_built_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The vocabulary is only known once the data is read: the model raises ModelError, the CLI reports it."""
    spec = with_base(
        data={"max_vocab": 50},
        model={"output": "adaptive", "tie_weights": False, "adaptive_cutoffs": [100, 200]},
    )
    spec["matrix"] = {"variants": ["baseline"], "seeds": [0]}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run-study", str(write_spec(tmp_path, spec)), "--tracking-uri", uri, "--no-progress"]
    assert main([*args, "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()  # above the last line: MLflow's own INFO lines
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "harness: error: model.adaptive_cutoffs=[100, 200] leave no tail cluster for a vocabulary of 50 words"
    )
