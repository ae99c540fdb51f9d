"""Shared fixtures: small real data, a throwaway MLflow store, a real PostgreSQL server, a shared Ray cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOE_HARNESS_DATA") or REPO.parent / "shared" / "data" / "wikitext")
TINY_LINES = {"train": 600, "validation": 120, "test": 120}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = SHARED_DATA / "wikitext-2-v1"
    if not folder.is_dir():
        pytest.fail(f"WikiText-2 not found at {folder}; set MOE_HARNESS_DATA")
    return SHARED_DATA


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here, not in tests/reliability/conftest.py: pytest reads options only from the conftest files it loads first.
    group = parser.getgroup("reliability", "the reliability cases (tests/reliability, run with -m reliability)")
    group.addoption("--reliability-seed", type=int, default=0, help="seed of the random moments and of the slice")
    group.addoption(
        "--reliability-slice", type=int, default=0, metavar="N", help="run N cases per part, drawn with the seed"
    )


def write_tiny_data(source: Path, root: Path) -> Path:
    """The first lines of each WikiText-2 split under ``source``, in the same parquet layout under ``root``."""
    folder = root / "wikitext-2-v1"
    folder.mkdir(parents=True)
    for split, n_lines in TINY_LINES.items():
        name = f"{split}-00000-of-00001.parquet"
        table = pq.read_table(source / "wikitext-2-v1" / name).slice(0, n_lines)
        pq.write_table(pa.table({"text": table.column("text")}), folder / name)
    return root


@pytest.fixture(scope="session")
def tiny_data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first lines of each real WikiText-2 split, in the same parquet layout."""
    return write_tiny_data(shared_data, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One harness cache for the whole run: the tiny data tokenised once, MLflow's empty store migrated once."""
    return tmp_path_factory.mktemp("cache")


@contextmanager
def harness_environment(data: Path, cache: Path) -> Iterator[pytest.MonkeyPatch]:
    """The environment every test runs in (the tiny data, the run's cache), for a fixture of module or session scope:
    those are set up before a test's own environment (``isolated_env``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOE_HARNESS_DATA", str(data))
        patch.setenv("MOE_HARNESS_CACHE", str(cache))
        yield patch


@pytest.fixture(autouse=True)
def isolated_env(tiny_data: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test reads the tiny data and the run's shared cache; nothing touches ./mlruns or ~/.cache."""
    monkeypatch.setenv("MOE_HARNESS_DATA", str(tiny_data))
    monkeypatch.setenv("MOE_HARNESS_CACHE", str(shared_cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def torch_threads() -> None:
    """Each test starts at torch's default thread count: a trial sets the process's count (``train.threads``), and
    one trained by an earlier test or by a module's fixture (set up before this) would leave the test on one thread
    (the classic-recipe reference: 71 s instead of 42 s)."""
    import torch

    from harness.step import DEFAULT_THREADS

    torch.set_num_threads(DEFAULT_THREADS)


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of the test's own, for a test about what the cache holds."""
    monkeypatch.setenv("MOE_HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Ends this process's Ray connection (and the cluster it started) when the run ends."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def shared_ray(ray_session: None, tiny_data: Path, shared_cache: Path) -> None:
    """One local Ray cluster for the tests that run cells on Ray but are not about a cluster's life: started on first
    use and kept for the run. ``--ray local`` and cells at once find this process connected and run on it, as from
    a notebook (:func:`harness.engine.ray_cluster.connect`); a test that builds a cluster of its own ends it first."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    env = {"MOE_HARNESS_DATA": str(tiny_data), "MOE_HARNESS_CACHE": str(shared_cache)}  # the workers' environment
    ray.init(address="local", log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": env})
    for signum, handler in handlers.items():  # ray.init takes SIGTERM over; pytest's own handling stays
        signal.signal(signum, handler)


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: drop to the postgres user when we are root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL 15 on loopback, in a temp dir; yields a SQLAlchemy URL of a fresh database."""
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        pytest.fail("PostgreSQL binaries (initdb, pg_ctl) are not on PATH")
    base = Path(tempfile.mkdtemp(prefix="harness-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    port = free_port()
    subprocess.run(
        _as_postgres(["initdb", "-D", str(data), "-U", "harness", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        _as_postgres(
            [
                "pg_ctl",
                "-D",
                str(data),
                "-l",
                str(base / "log"),
                "-w",
                "-o",
                f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c max_connections=200",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        url = f"postgresql+psycopg2://harness@127.0.0.1:{port}/postgres"
        deadline = time.time() + 30
        import sqlalchemy

        while True:
            try:
                with sqlalchemy.create_engine(url).connect():
                    break
            except sqlalchemy.exc.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield f"postgresql+psycopg2://harness@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres(["pg_ctl", "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(server: str, prefix: str = "t") -> str:
    """Create an empty database on ``server``: ``postgresql+psycopg2://.../<prefix>_<random>``."""
    import uuid

    import sqlalchemy

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return f"{server}/{name}"


@pytest.fixture
def postgres_db(postgres_server: str) -> str:
    """A fresh, empty database on the session's server."""
    return fresh_database(postgres_server)
