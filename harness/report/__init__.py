"""``harness report``: a study's Markdown + PDF report, built only from the MLflow tracking store.

Modules, each depending only on those above it:

- ``significance``: mean ± sd with a 95% CI over seeds; each variant tested against the baseline.
- ``blocks``: the document model's blocks (heading, paragraph, bullets, table, figure).
- ``formatting``: how numbers read in tables and sentences.
- ``gather``: the study's runs, curves and utilisation tables read from MLflow (``StudyData``).
- ``figures``: the PNG figures (matplotlib, seaborn heatmaps, Optuna's views).
- ``overview``, ``comparison``, ``tuning``: the sections, each a function returning blocks.
- ``document``: which sections the report has, in order.
- ``markdown``, ``pdf``: the two writers; both lay out the same blocks.
- ``pipeline``: ``write_report``, gather -> figures -> document -> writers -> MLflow artifacts.
- ``command``: the ``harness report`` command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.report.command import register

if TYPE_CHECKING:
    from harness.report.pipeline import write_report

__all__ = ["register", "write_report"]


def __getattr__(name: str) -> Any:
    # The CLI imports this package on every start to register the command; mlflow, matplotlib and seaborn
    # would add ~1.5x the CLI's start-up time (measured: cli 13 s, +8 s mlflow, +6-9 s matplotlib/seaborn on the
    # loaded 2-core box), so ``write_report`` and its modules load only when a report is made.
    if name == "write_report":
        from harness.report.pipeline import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
