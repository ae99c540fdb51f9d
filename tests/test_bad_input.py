"""Bad input: one line on stderr, exit code 2, and nothing written (no store, no claims, no checkpoints);
against an existing store, the store is byte for byte what it was."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.checkpoint import cell_checkpointer
from harness.cli import main
from harness.data import load_corpus
from harness.trainer import Checkpointer
from tests.conftest import free_port
from tests.studies import tiny_config, tiny_spec, with_keys, write_spec
from tests.workers import REPO, harness_env


def run_cli(tmp_path: Path, spec: Path, *extra: str) -> int:
    uri = f"sqlite:///{tmp_path / 'out' / 'mlruns' / 'mlflow.db'}"
    args = ["run-study", str(spec), "--tracking-uri", uri, "--checkpoint-dir", str(tmp_path / "out" / "ck")]
    return main([*args, "--no-progress", *extra])


def assert_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str], code: int, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("harness: error: ") and message in err, err
    written = (
        sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else []
    )
    assert not written, f"bad input wrote {written}"


def edited(tmp_path: Path, change: dict) -> Path:
    return write_spec(tmp_path / "edited.yaml", with_keys(tiny_config("bad", ["baseline"]), change))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"base.moe.n_expert": 4}, "unknown key 'moe.n_expert' (did you mean 'n_experts'?)"),
        ({"matrx": {}}, "unknown key 'matrx' (did you mean 'matrix'?)"),
        ({"base.budget.log_every_step": 2}, "(did you mean 'log_every_steps'?)"),
        ({"base.optim.lr": "fast"}, "optim.lr = 'fast': Input should be a valid number"),
        ({"base.train.batch_size": [8]}, "train.batch_size = [8]: Input should be a valid integer"),
        ({"overrides.baseline.moe.top_k": 9}, "moe.top_k=9 exceeds moe.n_experts=4 (variant baseline)"),
        ({"base.moe.lora_rank": 0}, "moe.lora_rank = 0: Input should be greater than or equal to 1"),
        ({"base.moe.aux_loss_coef": -1.0}, "moe.aux_loss_coef = -1.0: Input should be greater than or equal to 0"),
        ({"base.budget.epochs": 1}, "budget needs exactly one of budget.epochs or budget.tokens"),
        ({"base.train.batch_size": 10_000_000}, "too few for train.batch_size = 10,000,000"),
        ({"base.train.eval_batch_size": 100_000}, "too few for train.eval_batch_size = 100,000"),
        ({"base.budget.tokens": 10**15}, "more than 1,000 is refused (ask for it with budget.epochs)"),
        ({"base.model.d_model": 10**9}, "the model cannot be built (Storage size calculation overflowed"),
        ({"base.model.d_model": 60_000}, "of memory available on this machine"),
        ({"description": "x" * 25_000}, "description has 25,000 characters; MLflow keeps at most 8,000"),
        ({"base.model.adaptive_cutoffs": list(range(10, 20_000, 10))}, "MLflow params hold at most 6,000"),
    ],
    ids=[
        "unknown-nested",
        "unknown-top",
        "unknown-budget",
        "type-str",
        "type-list",
        "k>n",
        "rank<1",
        "neg-coef",
        "2-budgets",
        "batch>split",
        "eval-batch>split",
        "1e15-tokens",
        "d_model-overflows",
        "d_model-out-of-memory",
        "long-description",
        "long-param",
    ],
)
def test_bad_spec_values(tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, message: str) -> None:
    assert_rejected(tmp_path, capsys, run_cli(tmp_path, edited(tmp_path, change)), message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--bogus",), "unrecognized arguments: --bogus (see: harness --help)"),
        (("--cell", "one"), "argument --cell: invalid int value: 'one' (see: harness run-study --help)"),
    ],
)
def test_bad_command_line_arguments_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], message: str
) -> None:
    spec = tiny_spec(tmp_path, "bad", ["baseline"])
    with pytest.raises(SystemExit) as stop:
        run_cli(tmp_path, spec, *extra)
    assert_rejected(tmp_path, capsys, stop.value.code, message)


def test_malformed_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: t\nbase:\n  moe: {n_experts: 4\nmatrix: [x\n")
    assert_rejected(tmp_path, capsys, run_cli(tmp_path, spec), "malformed YAML at line")


def test_unreachable_tracking_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_spec(tmp_path, "bad", ["baseline"])
    code = run_cli(tmp_path, spec, "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert_rejected(tmp_path, capsys, code, "is unreachable")


def run_tune_cli(tmp_path: Path, *extra: str) -> int:
    uri = f"sqlite:///{tmp_path / 'out' / 'mlruns' / 'mlflow.db'}"
    spec = str(REPO / "studies" / "tune.yaml")
    return main(
        ["tune", spec, "--tracking-uri", uri, "--no-progress", "--out", str(tmp_path / "out" / "best.yaml"), *extra]
    )


def test_unreachable_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_tune_cli(tmp_path, "--storage", f"postgresql://harness:secret@127.0.0.1:{free_port()}/db")
    assert_rejected(tmp_path, capsys, code, "storage postgresql://harness:***@127.0.0.1")
    assert "secret" not in capsys.readouterr().err


def test_unusable_database_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_tune_cli(tmp_path, "--storage", "nosuchdb://somewhere/x")
    assert_rejected(tmp_path, capsys, code, "Optuna storage nosuchdb://somewhere/x is unusable")


def test_corrupt_parquet(tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train = data / "wikitext-2-v1" / "train-00000-of-00001.parquet"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])  # truncated download
    monkeypatch.setenv("MOE_HARNESS_DATA", str(data))
    spec = tiny_spec(tmp_path, "bad", ["baseline"])
    assert_rejected(tmp_path, capsys, run_cli(tmp_path, spec), "not a readable parquet file")


def test_an_empty_split_is_refused_before_anything_runs(
    tmp_path: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    test_file = data / "wikitext-2-v1" / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), test_file)
    monkeypatch.setenv("MOE_HARNESS_DATA", str(data))
    spec = tiny_spec(tmp_path, "bad", ["baseline"])
    assert_rejected(tmp_path, capsys, run_cli(tmp_path, spec), f"{test_file}: the test split is empty")


def test_checkpoint_from_an_incompatible_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.config import load_spec
    from harness.matrix import expand

    spec_path = tiny_spec(tmp_path, "bad", ["baseline"])
    spec = load_spec(spec_path)
    (trial,) = expand(spec)
    path = cell_checkpointer(tmp_path / "out" / "ck", spec, trial, load_corpus(trial.config.data)).path
    other = trial.config.model_copy(update={"seed": 7})
    Checkpointer(path, other.model_dump(mode="json")).save({"step": 3})
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    code = run_cli(tmp_path, spec_path)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "checkpoint was written for a different config" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before  # only the checkpoint


@pytest.mark.slow
def test_unreachable_servers_from_the_real_command_line_print_one_line(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, "bad", ["baseline"])
    command = [sys.executable, "-m", "harness", "run-study", str(spec), "--checkpoint-dir", str(tmp_path / "ck")]
    cases = {
        "tracking server": ["--tracking-uri", f"http://127.0.0.1:{free_port()}"],
        "no Ray cluster answers there": ["--ray", f"127.0.0.1:{free_port()}"],
    }
    started = {  # side by side: each only starts and refuses
        message: subprocess.Popen(
            [*command, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=harness_env(),
            cwd=tmp_path,
        )
        for message, extra in cases.items()
    }
    for message, process in started.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and message in err, err
        assert "Traceback" not in err and not out
    assert not (tmp_path / "ck").exists() and not (tmp_path / "mlruns").exists()


# ------------------------------------------------------ issue 13: every class, against an existing store


@pytest.fixture(scope="session")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow store with one experiment, made once; each test gets a copy under ``out/mlruns``."""
    from harness.tracking import TrackingStore

    folder = tmp_path_factory.mktemp("store") / "mlruns"
    TrackingStore(f"sqlite:///{folder / 'mlflow.db'}").experiment_id("bad")
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def rejected_once(capsys: pytest.CaptureFixture[str], code: int, message: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and len(err) < 1000, err[:2000]
    assert err.startswith("harness: error: ") and message in err, err
    return err


def spec_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "raw.yaml"
    path.write_text(text)
    return path


def binary_file(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 4)
    return path


BASE_SPEC = "name: bad\nmatrix: {variants: [baseline], seeds: [0]}\n"
BAD_SPECS = {  # id -> (how to make the spec, what the one line says)
    "binary-file": (lambda t: binary_file(t / "raw.yaml"), "not a text file"),
    "directory": (lambda t: t, "is a directory"),
    "duplicate-key": (lambda t: spec_text(t, BASE_SPEC + "name: again\n"), "duplicate key 'name'"),
    "scalar-section": (lambda t: edited(t, {"base.moe": 5}), "base.moe = 5: a section must be a mapping"),
    "override-scalar": (lambda t: edited(t, {"overrides.baseline.optim": "fast"}), "overrides.baseline.optim = 'fast'"),
    "sweep-into-int": (lambda t: edited(t, {"matrix.sweep": {"moe.n_experts.width": [1]}}), "is not a config value"),
    "empty-sweep": (lambda t: edited(t, {"matrix.sweep": {"moe.n_experts": []}}), "matrix.sweep.moe.n_experts"),
    "huge-seed": (lambda t: edited(t, {"matrix.seeds": [1e20]}), "matrix.seeds.0"),
    "negative-seed": (lambda t: edited(t, {"matrix.seeds": [-1]}), "greater than or equal to 0"),
    "betas": (lambda t: edited(t, {"base.optim.betas": [2, -1]}), "optim.betas.0 = 2"),
    "threads": (lambda t: edited(t, {"base.train.threads": 1e6}), "train.threads = 1000000"),
    "huge-value": (lambda t: edited(t, {"base.optim.lr": "x" * 100_000}), "characters)"),
}


@pytest.mark.parametrize(("make", "message"), BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_spec_is_one_line_exit_2_and_leaves_the_store_unchanged(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    store_template: Path,
    make,
    message: str,  # noqa: ANN001
) -> None:
    shutil.copytree(store_template, tmp_path / "out" / "mlruns")
    before = digest(tmp_path / "out")
    rejected_once(capsys, run_cli(tmp_path, make(tmp_path)), message)
    assert digest(tmp_path / "out") == before


UNWRITABLE = "/proc/harness-nowhere"  # read-only for root too, unlike a chmod'ed folder
BAD_PLACES = {  # id -> (extra arguments, what the one line says)
    "uri-unknown-scheme": (["--tracking-uri", "ftp://example.org/store"], "expected one of sqlite://"),
    "uri-bare-path": (["--tracking-uri", "mlruns"], "expected one of"),
    "uri-not-a-database": (["--tracking-uri", "sqlite:///{spec}"], "not an SQLite database"),
    "uri-read-only": (["--tracking-uri", f"sqlite:///{UNWRITABLE}/mlflow.db"], "tracking store folder"),
    "checkpoint-read-only": (["--checkpoint-dir", f"{UNWRITABLE}/ck"], "--checkpoint-dir"),
    "checkpoint-is-a-file": (["--checkpoint-dir", "{spec}"], "--checkpoint-dir"),
}


@pytest.mark.parametrize(("extra", "message"), BAD_PLACES.values(), ids=BAD_PLACES.keys())
def test_bad_places_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], store_template: Path, extra: list[str], message: str
) -> None:
    shutil.copytree(store_template, tmp_path / "out" / "mlruns")
    spec = tiny_spec(tmp_path, "bad", ["baseline"])
    before = digest(tmp_path / "out")
    rejected_once(capsys, run_cli(tmp_path, spec, *(e.format(spec=spec) for e in extra)), message)
    assert digest(tmp_path / "out") == before


RUNS = {"in-process": (), "one-cell": ("--cell", "0"), "ray": ("--ray", "local")}  # each does its own preflight


@pytest.mark.parametrize("extra", RUNS.values(), ids=RUNS.keys())
def test_cuda_without_cuda_is_refused_before_the_store_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...]
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = run_cli(tmp_path, edited(tmp_path, {"base.train.device": "cuda"}), *extra)
    assert_rejected(tmp_path, capsys, code, "edited.yaml: baseline: train.device = 'cuda' but no CUDA device")


@pytest.mark.parametrize("extra", RUNS.values(), ids=RUNS.keys())
def test_a_missing_data_folder_is_refused_before_the_store_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...]
) -> None:
    monkeypatch.setenv("MOE_HARNESS_DATA", str(tmp_path / "nowhere"))
    folder = tmp_path / "nowhere" / "wikitext-2-v1"
    message = f"data folder '{folder}' does not exist (set $MOE_HARNESS_DATA, or run 'harness data download')"
    assert_rejected(tmp_path, capsys, run_cli(tmp_path, tiny_spec(tmp_path, "bad", ["baseline"]), *extra), message)


def test_parquet_without_text_column(tmp_path: Path, tiny_data: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    pq.write_table(pa.table({"words": ["a b"] * 10}), data / "wikitext-2-v1" / "test-00000-of-00001.parquet")
    monkeypatch.setenv("MOE_HARNESS_DATA", str(data))
    spec = tiny_spec(tmp_path, "bad", ["baseline"])
    assert_rejected(tmp_path, capsys, run_cli(tmp_path, spec), "with a 'text' column")


def test_a_full_disk_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import harness.study.driver

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(harness.study.driver, "run_study", full)
    spec = tiny_spec(tmp_path, "bad", ["baseline"])
    rejected_once(capsys, run_cli(tmp_path, spec), "No space left on device")


def test_report_fails_fast_on_a_dead_server_and_creates_no_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    rejected_once(capsys, main(["report", "nosuch", "--tracking-uri", "http://127.0.0.1:1"]), "is unreachable")
    assert time.monotonic() - started < 15
    database = tmp_path / "none" / "mlflow.db"
    rejected_once(capsys, main(["report", "nosuch", "--tracking-uri", f"sqlite:///{database}"]), "no such database")
    assert not (tmp_path / "none").exists()
