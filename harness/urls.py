"""Database and tracking URLs: the file behind a ``sqlite:///`` one, and how one is shown."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy

SQLITE = "sqlite:///"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL; None for any other URL."""
    return Path(url.removeprefix(SQLITE)) if url.startswith(SQLITE) else None


def absolute(url: str) -> str:
    """A ``sqlite:///`` URL with an absolute path (processes elsewhere, e.g. Ray tasks, have another cwd)."""
    path = sqlite_path(url)
    return url if path is None else f"{SQLITE}{path.resolve()}"


def redact(url: str) -> str:
    """The URL with its password hidden (as shown in logs and tags); an unparsable URL as it is."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url
