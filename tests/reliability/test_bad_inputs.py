"""Bad input to the real command line (every case of ``bad_cases.CASES``): exit code 2, one short line on stderr,
nothing written (a fresh folder, or a copy of an existing store, exactly as it was)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_tiny_data
from tests.reliability.bad_cases import CASES, STUDY, Case, Place
from tests.reliability.processes import Finished, one_line, run_harness, sqlite_uri, subprocess_env
from tests.studies import tiny_spec

pytestmark = pytest.mark.reliability

NOBODY = 65534
MAX_LINE = 500
CASE_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def open_folder(shared_data: Path) -> Iterator[Path]:
    """A work folder every user may enter, with the tiny data and a HOME: pytest's temporary folders are private to
    this user, out of reach of the cases that run as nobody."""
    folder = Path(tempfile.mkdtemp(prefix="harness-reliability-"))
    folder.chmod(0o755)
    write_tiny_data(shared_data, folder / "data")
    (folder / "home").mkdir()
    (folder / "home").chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def case_env(open_folder: Path, cache: Path, changes: dict[str, str]) -> dict[str, str]:
    """The harness's environment: the open folder's data and HOME, ``cache``, what the case ``changes``."""
    home, data = str(open_folder / "home"), str(open_folder / "data")
    return subprocess_env(**{"MOE_HARNESS_DATA": data, "MOE_HARNESS_CACHE": str(cache), "HOME": home} | changes)


@pytest.fixture(scope="session")
def existing_store(open_folder: Path) -> Path:
    """A tiny finished study (one dense cell): copied into each case against an existing store."""
    folder = open_folder / "existing"
    spec = tiny_spec(folder, STUDY, ["dense"])
    store = folder / "mlruns"
    args = ["run-study", str(spec), "--tracking-uri", sqlite_uri(store / "mlflow.db"), "--no-progress"]
    env = case_env(open_folder, open_folder / "cache", {})
    done = run_harness([*args, "--checkpoint-dir", str(folder / "ck")], folder, env)
    assert done.code == 0, f"the existing store did not build (exit {done.code}): {done.stderr[-2000:]}"
    return store


def digest(folder: Path) -> dict[str, str]:
    """Every path under ``folder``: a file's sha256, or 'dir' / 'link' (what a case must leave as it found)."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "link"
        elif path.is_dir():
            found[key] = "dir"
        elif path.is_file():
            try:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as error:
                found[key] = f"unreadable: {error.strerror}"
    return found


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Created, removed and changed paths; the tokenisation cache (keyed by content, no record of a study) aside."""
    created = [f"+{p}" for p in after if p not in before]
    removed = [f"-{p}" for p in before if p not in after]
    changed = [f"~{p}" for p in before if p in after and before[p] != after[p]]
    return [path for path in created + removed + changed if not path[1:].startswith("cache")]


def skip_reason(case: Case) -> str | None:
    if case.needs_no_cuda and Path("/dev/nvidiactl").exists():
        return "this machine has an NVIDIA device"
    if case.needs_mount and os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if case.as_nobody and os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "as root, with no setpriv to drop privileges"
    return None


def run_as(case: Case, folder: Path) -> int | None:
    """Who runs the case: nobody when it relies on permissions and this is root (its folder then nobody's; what the
    case makes read-only stays root's); None: this process's user."""
    if not (case.as_nobody and os.geteuid() == 0):
        return None
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    return NOBODY


def judge(done: Finished, written: list[str], case: Case) -> list[str]:
    """Why the case failed (empty: it passed)."""
    reasons = []
    if done.code != 2:
        reasons.append("timed out" if done.code is None else f"exit code {done.code}")
    lines = done.stderr.strip().splitlines()
    if len(lines) != 1:
        reasons.append(f"{len(lines)} lines on stderr: " + " | ".join(one_line(line, 90) for line in lines[:3]))
    elif len(lines[0]) >= MAX_LINE:
        reasons.append(f"the line has {len(lines[0]):,} characters")
    if written:
        reasons.append(f"wrote {len(written)} path(s): {', '.join(written[:4])}")
    if case.max_s is not None and done.seconds > case.max_s:
        reasons.append(f"took {done.seconds:.0f} s (limit {case.max_s:.0f} s)")
    return reasons


def restore_permissions(folder: Path) -> None:
    """Full access to a case's folder again (to copy and remove it)."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            mode = stat.S_IMODE(path.stat().st_mode)
            path.chmod(mode | (0o700 if path.is_dir() else 0o600))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: Case, open_folder: Path, existing_store: Path, tmp_path: Path
) -> None:
    if reason := skip_reason(case):
        pytest.skip(reason)
    place = Place(open_folder / "cases" / case.name, open_folder / "data")
    place.folder.mkdir(parents=True)
    if case.existing:
        shutil.copytree(existing_store, place.database.parent, symlinks=True)
    try:
        as_user = run_as(case, place.folder)
        args = case.make(place)
        before = digest(place.folder)
        env = case_env(open_folder, place.folder / "cache", place.env)
        done = run_harness(args, place.folder, env, CASE_TIMEOUT_S, as_user)
        reasons = judge(done, changes(before, digest(place.folder)), case)
    finally:
        for mount in place.mounts:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        restore_permissions(place.folder)
    if reasons:  # pytest keeps tmp_path, unlike the open folder
        shutil.copytree(place.folder, tmp_path / case.name, symlinks=True)
        (tmp_path / "stderr.txt").write_text(done.stderr)
    detail = f"[{case.kind}] exit {done.code} in {done.seconds:.1f} s, stderr ends: {one_line(done.stderr[-400:], 400)}"
    assert not reasons, f"{'; '.join(reasons)}; {detail} (the case's folder and stderr: {tmp_path})"
