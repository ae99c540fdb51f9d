"""Typed, validated configuration: the one place that knows what a study spec may contain.

:mod:`.schema` is what a spec and a trial config may hold, :mod:`.resolution` turns a spec into trial configs,
:mod:`.loading` reads a spec file and checks it, :mod:`.errors` words what is wrong in one line. None of it looks at
the machine it runs on (see :mod:`harness.preflight`). Import the names from here.
"""

from harness.config.errors import HarnessError, SpecError, describe_error, shorten
from harness.config.loading import check_spec, check_tune, load_spec
from harness.config.resolution import ResolvedTrial, deep_merge, resolve_matrix, resolve_trial, set_dotted, source_order
from harness.config.schema import (
    DATA_ENV,
    DEFAULT_DATA_PATH,
    VARIANT_PRESETS,
    VARIANTS,
    BudgetConfig,
    CustomVariant,
    DataConfig,
    DesignConfig,
    InitConfig,
    MatrixConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    Question,
    ResourcesConfig,
    SpeedConfig,
    StudySpec,
    TrainConfig,
    TrialConfig,
    TuneConfig,
    TuneParam,
    Variant,
    reference_variant,
)

__all__ = [
    "reference_variant",
    "DATA_ENV",
    "DEFAULT_DATA_PATH",
    "VARIANTS",
    "VARIANT_PRESETS",
    "BudgetConfig",
    "CustomVariant",
    "DataConfig",
    "InitConfig",
    "MatrixConfig",
    "ModelConfig",  # re-exported: the models' own config, part of every trial config
    "MoEConfig",  # re-exported, as ModelConfig
    "OptimConfig",
    "DesignConfig",
    "Question",
    "SpeedConfig",
    "ResolvedTrial",
    "ResourcesConfig",
    "HarnessError",
    "SpecError",
    "StudySpec",
    "TrainConfig",
    "TrialConfig",
    "TuneConfig",
    "TuneParam",
    "Variant",
    "check_spec",
    "check_tune",
    "deep_merge",
    "describe_error",
    "load_spec",
    "resolve_matrix",
    "resolve_trial",
    "set_dotted",
    "shorten",
    "source_order",
]
