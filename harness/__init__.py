"""moe-harness: Mixture-of-Experts layers in small language models, trained, tracked in MLflow and reported.

The names a script needs to run a study (the README's "Scripting a study")::

    from harness import load_spec, run_study, write_report

    spec = load_spec("studies/tiny.yaml")
    outcome = run_study(spec, "sqlite:///mlruns/mlflow.db")
    write_report(spec.name, "sqlite:///mlruns/mlflow.db")

Each loads on first use: every ``harness`` command and submodule imports this package first, and the study runner
and the report pull in torch, MLflow and matplotlib.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: this module is on every start's path
if TYPE_CHECKING:
    from typing import Any

    from harness.cells import StudyOutcome
    from harness.config import HarnessError, SpecError, StudySpec, TrialConfig, load_spec
    from harness.report import write_report
    from harness.study.driver import run_study

__all__ = [
    "HarnessError",
    "SpecError",
    "StudyOutcome",
    "StudySpec",
    "TrialConfig",
    "load_spec",
    "run_study",
    "write_report",
]

_HOMES = {
    "HarnessError": "harness.config",
    "SpecError": "harness.config",
    "StudySpec": "harness.config",
    "TrialConfig": "harness.config",
    "load_spec": "harness.config",
    "StudyOutcome": "harness.cells",
    "run_study": "harness.study.driver",
    "write_report": "harness.report",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
