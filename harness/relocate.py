"""Move an embedded MLflow store (``mlruns/``): point its recorded artifact locations at where it is now.

MLflow records every experiment's and run's artifact location as an absolute ``file://`` URI (it
resolves relative paths when it stores them), so a copied or moved ``mlruns/`` folder shows "No
Artifacts Recorded" in the UI and answers 404 for files that are there. MLflow has no call that
changes a recorded location, so :func:`relocate` rewrites the three columns that hold them in the
SQLite database: ``experiments.artifact_location``, ``runs.artifact_uri`` and
``logged_models.artifact_location``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import sqlalchemy as sa

from harness.config import SpecError

DATABASE, ARTIFACTS = "mlflow.db", "artifacts"  # the embedded store's layout (harness.tracking)
LOCATIONS = {"experiments": "artifact_location", "runs": "artifact_uri", "logged_models": "artifact_location"}


def recorded_store(location: str) -> Path | None:
    """The store folder an experiment's ``file://…/<store>/artifacts/<name>`` location was recorded under."""
    if urlparse(location).scheme != "file":
        return None
    path = Path(unquote(urlparse(location).path))
    return path.parent.parent if path.parent.name == ARTIFACTS else None


def relocate(store_dir: Path) -> int:
    """Rewrite the store's artifact locations to lie under ``store_dir``; how many rows changed."""
    database = store_dir / DATABASE
    if not database.is_file():
        raise SpecError(f"{store_dir}: no MLflow store here (expected {database})")
    check_store_writable(store_dir, database)
    engine = sa.create_engine(f"sqlite:///{database.resolve()}")
    try:
        return _rewrite_locations(engine, store_dir.resolve().as_uri())
    except sa.exc.DatabaseError as error:  # what the checks cannot see: a lock, a file system that turns read-only
        reason = (str(error.orig).strip().splitlines() or [type(error.orig).__name__])[0]
        raise SpecError(f"store {store_dir}: {database} could not be updated ({reason})") from None
    finally:
        engine.dispose()


def check_store_writable(store_dir: Path, database: Path) -> None:
    """SpecError unless SQLite can update ``database``: the folder too must take files (its journal goes there)."""
    from harness.tracking import check_writable  # here: the CLI imports this module on every start, MLflow is slow

    check_writable(store_dir, "store")
    if not os.access(database, os.W_OK):  # root passes this for any file, but not on a read-only mount
        raise SpecError(f"store {store_dir}: {database} is read-only")


def _rewrite_locations(engine: sa.Engine, new_root: str) -> int:
    """Replace every recorded store folder other than ``new_root`` by it, in one transaction; rows changed."""
    changed = 0
    with engine.begin() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        locations = conn.execute(sa.text("SELECT artifact_location FROM experiments")).scalars().all()
        old_roots = {store.as_uri() for loc in locations if loc and (store := recorded_store(loc)) is not None}
        for old_root in old_roots - {new_root}:
            for table, column in LOCATIONS.items():
                if table not in tables:
                    continue
                # prefix replacement: the part after the old store folder stays as it was
                statement = sa.text(
                    f"UPDATE {table} SET {column} = :new || substr({column}, :cut) "
                    f"WHERE substr({column}, 1, :length) = :old"
                )
                params = {"new": new_root, "old": old_root + "/", "cut": len(old_root) + 1}
                params["length"] = len(old_root) + 1
                changed += conn.execute(statement, params).rowcount
    return changed


def cmd_relocate(args: argparse.Namespace) -> int:
    store_dir = Path(args.store)
    changed = relocate(store_dir)
    print(f"{store_dir}: {changed} artifact location(s) now under {store_dir.resolve()}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    store = commands.add_parser("store", help="the embedded MLflow store").add_subparsers(
        dest="store_command", required=True
    )
    relocate_parser = store.add_parser(
        "relocate", help="after moving or copying an mlruns/ folder: point its artifact locations at where it is now"
    )
    relocate_parser.add_argument("store", nargs="?", default="mlruns", help="the store folder (default: mlruns)")
    relocate_parser.set_defaults(func=cmd_relocate)
