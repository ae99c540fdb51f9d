"""A cell's identity: what it computes, recorded on its run so that an edited spec never passes old results off.

The identity is the cell's resolved config, less the settings that only say where or how fast it runs
(:data:`EXECUTION_KEYS`), plus the content of its data (the sha256 of each split file). It is logged as the
run's params (the config's keys, as every trial run has them, and ``data.sha256.<split>``) and its hash as the
tag ``harness.fingerprint``. A rerun compares the cell's identity now with its run's recorded one: a cell whose
identity changed is not "already done" (:func:`changes`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mlflow.entities import Run

from harness.config import TrialConfig
from harness.data import Corpus
from harness.tags import FINGERPRINT

# Where the data is read from, threads, compilation, the fused optimiser kernel, whether final weights are kept, how
# often a resumable checkpoint is written: none changes what a cell computes beyond thread-count rounding.
EXECUTION_KEYS = frozenset(
    {
        "data.path",
        "train.threads",
        "train.compile",
        "optim.fused",
        "train.save_checkpoint",
        "budget.checkpoint_every_steps",
    }
)
DATA_KEY = "data.sha256.{split}"


def param_value(value: Any) -> str:
    """A config value as the MLflow param string every trial run records."""
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


# The moe.* keys a model without an MoE layer reads: a dense FFN's width and activation; no block: none.
MOE_KEYS_WITHOUT_ROUTER = {"dense": frozenset({"moe.d_hidden", "moe.activation"}), "none": frozenset()}


def used(key: str, config: TrialConfig) -> bool:
    """Whether the model reads ``key``: every key but the MoE layer's, for a model that has none, and but the LoRA
    keys, for MLP experts."""
    kept = MOE_KEYS_WITHOUT_ROUTER.get(config.model.ffn)
    if kept is not None:
        return not key.startswith("moe.") or key in kept
    return config.moe.expert == "lora" or not key.startswith("moe.lora_")


def run_params(config: TrialConfig, corpus: Corpus) -> dict[str, str]:
    """Every param a cell's run records: the resolved config's keys its model reads (no router settings on a
    dense or plain reference) and its data's content hashes."""
    params = {key: param_value(value) for key, value in config.flat().items() if used(key, config)}
    return params | {DATA_KEY.format(split=split): sha for split, sha in corpus.sha256.items()}


def identity(config: TrialConfig, corpus: Corpus) -> dict[str, str]:
    """What the cell computes: :func:`run_params` less :data:`EXECUTION_KEYS`."""
    return {key: value for key, value in run_params(config, corpus).items() if key not in EXECUTION_KEYS}


def fingerprint(cell_identity: dict[str, str]) -> str:
    """A short hash of an identity (the run's ``harness.fingerprint`` tag)."""
    return hashlib.sha256(json.dumps(cell_identity, sort_keys=True).encode()).hexdigest()[:16]


def changes(run: Run, cell_identity: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """Key -> (recorded, now) for every identity key on which ``run`` differs from the cell now; empty: the same."""
    if run.data.tags.get(FINGERPRINT) == fingerprint(cell_identity):
        return {}
    recorded = run.data.params
    return {key: (recorded.get(key), now) for key, now in sorted(cell_identity.items()) if recorded.get(key) != now}


def describe_changes(differences: dict[str, tuple[str | None, str | None]], shown: int = 4) -> str:
    """``key old -> new`` for the first ``shown`` differences, on one line."""
    items = [f"{key} {_short(old)} -> {_short(new)}" for key, (old, new) in differences.items()]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _short(value: str | None, chars: int = 40) -> str:
    if value is None:
        return "(none)"
    return value if len(value) <= chars else f"{value[:chars]}..."
