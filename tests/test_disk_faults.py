"""A full disk, a killed writer and a read-only store: one line naming the path, and nothing left behind.

The full disk is real where this machine lets the tests mount a small tmpfs (root, a privileged container)
and patched in (the writer raises ENOSPC) everywhere else, so the behaviour is checked on every machine.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import harness.checkpoint
import harness.relocate
from harness.checkpoint import (
    CHECKPOINT_MARGIN,
    Checkpointer,
    CheckpointWriteError,
    check_room,
    checkpoint_bytes,
)
from harness.cli import main
from harness.config import SpecError
from harness.runs import ending
from harness.tags import ERROR
from tests.studies import run_study, tiny_spec

FINGERPRINT = {"config": "test"}
BIG = {"weights": torch.zeros(1 << 20)}  # 4 MiB: more than the 2 MiB tmpfs holds
SMALL = {"weights": torch.arange(1000.0)}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a tmpfs of the given size (``"2m"``); skips the test where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip() or result.returncode}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def assert_full_disk_error(error: CheckpointWriteError, path: Path) -> None:
    assert str(error) == f"no space left on device writing {path}"
    assert error.errno == errno.ENOSPC
    reason = ending(error)
    assert reason.status == "FAILED"
    assert reason.reason == f"CheckpointWriteError: no space left on device writing {path}"


def test_a_full_tmpfs_fails_the_save_in_one_line_and_leaves_the_last_checkpoint(
    tmpfs: Callable[[str], Path],
) -> None:
    folder = tmpfs("2m")
    checkpoint = Checkpointer(folder / "study" / "cell.pt", FINGERPRINT)
    checkpoint.save(SMALL)
    with pytest.raises(CheckpointWriteError) as raised:
        checkpoint.save(BIG)
    assert_full_disk_error(raised.value, checkpoint.path)
    assert leftovers(folder) == []
    assert torch.equal(checkpoint.load()["weights"], SMALL["weights"])  # the last good one, whole
    checkpoint.path.unlink()  # room again: the next save goes through
    checkpoint.save({"weights": torch.ones(1000)})
    assert torch.equal(checkpoint.load()["weights"], torch.ones(1000))


def test_a_full_disk_is_reported_the_same_where_no_tmpfs_can_be_mounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = harness.checkpoint.write_file

    def full(path: Path, data: memoryview) -> None:
        path.write_bytes(bytes(data[: len(data) // 2]))  # the disk filled up half-way
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    checkpoint = Checkpointer(tmp_path / "ck" / "study" / "cell.pt", FINGERPRINT)
    monkeypatch.setattr(harness.checkpoint, "write_file", full)
    with pytest.raises(CheckpointWriteError) as raised:
        checkpoint.save(SMALL)
    assert_full_disk_error(raised.value, checkpoint.path)
    assert leftovers(tmp_path) == [] and not checkpoint.path.exists()
    monkeypatch.setattr(harness.checkpoint, "write_file", real_write)
    checkpoint.save(SMALL)
    assert torch.equal(checkpoint.load()["weights"], SMALL["weights"])


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_partial_files_of_killed_writers_on_this_host_are_removed_by_the_next_save(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    host = socket.gethostname()
    killed = [folder / f"cell.{host}.{dead_pid()}.tmp", folder / f"other-cell.{host}.{dead_pid()}.tmp"]
    running = folder / f"other-cell.{host}.{os.getppid()}.tmp"  # a live writer: its file is in use
    elsewhere = folder / f"cell.some-other-host.{dead_pid()}.tmp"  # whether that writer lives is unknown here
    for partial in [*killed, running, elsewhere]:
        partial.write_bytes(b"half a checkpoint")
    Checkpointer(folder / "cell.pt", FINGERPRINT).save(SMALL)
    assert leftovers(folder) == sorted([running.name, elsewhere.name])


def test_room_for_a_checkpoint_is_checked_before_training(tmpfs: Callable[[str], Path]) -> None:
    folder = tmpfs("2m") / "study"
    needed = checkpoint_bytes(1_000_000, "adamw")
    with pytest.raises(SpecError) as raised:
        check_room(folder, needed, "baseline/seed=0")
    message = str(raised.value)
    assert message.startswith(f"--checkpoint-dir {folder}: ") and len(message.splitlines()) == 1
    assert "MiB free, checkpointing baseline/seed=0 needs about 12.6 MiB" in message
    check_room(folder, 1 << 20, "baseline/seed=0")  # 1 MiB fits
    assert not folder.exists()  # a check: nothing written
    folder.mkdir()
    stale = folder / f"cell.{socket.gethostname()}.{dead_pid()}.tmp"
    stale.write_bytes(bytes(1_500_000))  # a killed writer's file: the first save removes it, so it counts as free
    check_room(folder, 1_800_000, "baseline/seed=0")


def test_check_room_names_the_folder_when_the_disk_is_too_small(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^--checkpoint-dir .*/ck/study: .* free, checkpointing x needs about"):
        check_room(tmp_path / "ck" / "study", 1 << 60, "x")
    check_room(tmp_path / "ck" / "study", 1, "x")


def test_the_size_estimate_covers_a_real_checkpoint(tmp_path: Path) -> None:
    from harness.config import load_spec
    from harness.data import load_corpus
    from harness.matrix import expand
    from harness.step import build_train_state, train_step

    (cell,) = expand(load_spec(tiny_spec(tmp_path, "size", ["baseline"], [0])))
    corpus = load_corpus(cell.config.data)
    state, context = build_train_state(cell.config, corpus.train_counts(), torch.device("cpu"), 10)
    x = corpus.train[: 8 * 16].view(8, 16)
    state.recurrent = state.model.initial_state(8)
    train_step(state, context, x, x)  # AdamW's two state tensors exist after the first step
    checkpoint = Checkpointer(tmp_path / "ck" / "cell.pt", cell.config.model_dump(mode="json"))
    checkpoint.save(state.state_dict())
    real = checkpoint.path.stat().st_size
    parameters = sum(p.numel() for p in state.model.parameters())
    estimate = checkpoint_bytes(parameters, "adamw")
    assert real <= estimate <= real + real // 50 + CHECKPOINT_MARGIN
    assert checkpoint_bytes(parameters, "sgd") < checkpoint_bytes(parameters, "sgd", momentum=0.9) < estimate
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        checkpoint_bytes(parameters, "adam")


def test_a_cell_whose_checkpoint_cannot_be_written_fails_and_the_next_cell_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write, calls = harness.checkpoint.write_file, []

    def first_write_fails(path: Path, data: memoryview) -> None:
        calls.append(path)
        if len(calls) > 1:
            return real_write(path, data)
        path.write_bytes(bytes(data[:100]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(harness.checkpoint, "write_file", first_write_fails)
    spec = tiny_spec(tmp_path, "full", ["baseline", "dense"], [0], budget={"checkpoint_every_steps": 2})
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert run_study(tmp_path, spec, uri) == 1  # a trial failed, the study went on
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("full").experiment_id
    runs = {r.data.tags["variant"]: r for r in client.search_runs([experiment], "tags.`harness.role` = 'trial'")}
    failed = tmp_path / "ck" / "full" / "baseline-seed=0.pt"
    assert runs["baseline"].info.status == "FAILED"
    assert runs["baseline"].data.tags[ERROR] == f"CheckpointWriteError: no space left on device writing {failed}"
    assert runs["dense"].info.status == "FINISHED" and len(calls) > 1  # dense checkpointed, then finished
    assert leftovers(tmp_path / "ck") == [] and not failed.exists()


def test_a_study_refuses_a_checkpoint_folder_without_room_before_writing_anything(
    tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = tmpfs("2m")
    spec = tiny_spec(tmp_path, "cramped", ["baseline"], [0], budget={"checkpoint_every_steps": 2})
    store = tmp_path / "mlruns"
    args = ["run-study", str(spec), "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}"]
    assert main([*args, "--checkpoint-dir", str(checkpoints), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"--checkpoint-dir {checkpoints / 'cramped'}: " in line and "checkpointing baseline/seed=0 needs" in line
    assert not store.exists() and list(checkpoints.iterdir()) == []


def test_a_store_that_does_not_fit_on_the_disk_is_refused_in_one_line_leaving_nothing(
    tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmpfs("256k")  # MLflow's empty tables alone take about 600 kB
    spec = tiny_spec(tmp_path, "nowhere", ["dense"], [0])
    assert run_study(tmp_path, spec, f"sqlite:///{store / 'mlflow.db'}") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"harness: error: {store / 'mlflow.db'}: the disk is full ("), line
    # Only the empty lock file the builders share: removing it could let a second builder in beside a waiting one.
    assert [(path.name, path.stat().st_size) for path in store.iterdir()] == [("mlflow.db.lock", 0)]


# ------------------------------------------------------------------ harness store relocate on a read-only store


def moved_store(folder: Path) -> Path:
    """The two tables ``relocate`` rewrites, recorded under another folder (a store copied from elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    old = (folder.parent / "old" / "mlruns" / "artifacts").as_uri()
    with sqlite3.connect(folder / "mlflow.db") as db:
        db.execute("CREATE TABLE experiments (artifact_location TEXT)")
        db.execute("CREATE TABLE runs (artifact_uri TEXT)")
        db.execute("INSERT INTO experiments VALUES (?)", (f"{old}/study",))
        db.execute("INSERT INTO runs VALUES (?)", (f"{old}/study/run1/artifacts",))
    db.close()
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def refused(capsys: pytest.CaptureFixture[str], store: Path, message: str) -> None:
    before = digest(store)
    assert main(["store", "relocate", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"harness: error: store {store}") and message in err, err
    assert digest(store) == before


def test_relocate_refuses_a_read_only_database_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = moved_store(tmp_path / "mlruns")
    database = store / "mlflow.db"
    real_access = os.access
    # root may write any file whatever its mode bits, so the file's answer is what a non-root user would get
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != database and real_access(path, mode))
    refused(capsys, store, f"{database} is read-only")
    monkeypatch.undo()
    assert harness.relocate.relocate(store) == 2  # the same store, writable: both rows move


def test_relocate_refuses_a_store_on_a_read_only_mount(
    tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mount = tmpfs("2m")
    store = moved_store(mount / "mlruns")
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    refused(capsys, store, "not writable (Read-only file system)")
    monkeypatch.setattr(harness.relocate, "check_store_writable", lambda *args: None)
    refused(capsys, store, "could not be updated (attempt to write a readonly database)")  # SQLite's own refusal


# ------------------------------------------------------------------ harness report --out that is a file


def test_report_out_that_is_a_file_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.pdf"
    out.write_text("an older report")
    database = tmp_path / "mlruns" / "mlflow.db"
    for target, message in [(out, "is a file, not a folder"), (out / "sub", f"not writable ({out} is a file)")]:
        assert main(["report", "nosuch", "--tracking-uri", f"sqlite:///{database}", "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err == f"harness: error: --out {target}: {message}", err
    assert out.read_text() == "an older report" and sorted(tmp_path.iterdir()) == [out]
