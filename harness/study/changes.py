"""A rerun's cells whose identity changed since their run was recorded (:mod:`harness.fingerprint`): refused in
one line, or, with ``--supersede``, their old runs taken out of the study (kept, tagged superseded)."""

from __future__ import annotations

from mlflow.entities import Run

from harness.data import Corpus
from harness.fingerprint import changes, describe_changes, identity
from harness.matrix import Cell
from harness.preflight import corpus_key
from harness.runs import KILLED, RUNNING, SCHEDULED, cell_runs, end_run
from harness.tags import ROLE, ROLE_SUPERSEDED, SUPERSEDED
from harness.tracking import TrackingStore

Changes = dict[str, tuple[str | None, str | None]]


def changed_cells(
    store: TrackingStore, study: str, cells: list[Cell], corpora: dict[str, Corpus]
) -> dict[str, Changes]:
    """Cell key -> how its recorded run differs from what the cell computes now; only cells that differ.

    A cell that starts from a changed cell (``init.source``) has changed too: its starting weights will.
    Reads only: an unknown study has no recorded cells.
    """
    experiment = store.client.get_experiment_by_name(study)
    if experiment is None:
        return {}
    changed: dict[str, Changes] = {}
    runs = cell_runs(store, experiment.experiment_id)
    for cell in cells:
        run = runs.get(cell.key)
        corpus = corpora[corpus_key(cell)]
        differences = {} if run is None else changes(run, identity(cell.config, corpus))
        if cell.depends_on in changed:
            differences = differences or {"init.source run": (cell.depends_on, "a new run")}
        if differences and run is not None:
            changed[cell.key] = differences
    return changed


def refusal(study: str, changed: dict[str, Changes]) -> str:
    """One line: the study, the first changed cell and its keys (old -> new), how many more, and the way out."""
    key, differences = next(iter(changed.items()))
    more = f" (and {len(changed) - 1} more cells)" if len(changed) > 1 else ""
    return (
        f"study '{study}': cell {key} differs from its recorded run: {describe_changes(differences)}{more}; "
        f"rerun with --supersede to run changed cells as new runs (the old ones are kept, tagged superseded), "
        f"or give the study another name"
    )


def supersede_run(store: TrackingStore, run: Run, what_changed: str) -> None:
    """Take ``run`` out of its cell: its role becomes superseded (reports skip it; it stays in the UI)."""
    if run.info.status in (RUNNING, SCHEDULED):
        end_run(store.client, run.info.run_id, KILLED, "superseded: its cell changed")
    store.client.set_tag(run.info.run_id, SUPERSEDED, what_changed[:5000])
    store.client.set_tag(run.info.run_id, ROLE, ROLE_SUPERSEDED)  # last: the one write that moves it out
