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


UI_PORT = 5000  # mlflow ui's default
# The runs table of the "Model training" view: MLflow 3 opens an experiment in its GenAI view unless the page's
# URL names the workflow (its experiment page reads workflowType; checked in headless Chromium, MLflow 3.17.2).
RUNS_VIEW = "#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_link(tracking_uri: str, experiment_id: str) -> str:
    """Where a user sees a study's runs: the page on a tracking server, or for a database the ``mlflow ui`` command
    to start and the page it then serves."""
    page = RUNS_VIEW.format(experiment_id=experiment_id)
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {tracking_uri.rstrip('/')}/{page}"
    command = f"mlflow ui --backend-store-uri {redact(absolute(tracking_uri))} --port {UI_PORT}"
    return f"MLflow: run `{command}`, then open http://127.0.0.1:{UI_PORT}/{page}"
