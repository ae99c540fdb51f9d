"""MoE layers and the language-model backbones that host them.

The names below load on first use (PEP 562): the harness CLI imports ``models.config`` and must
start without importing torch (which takes seconds cold, many times the CLI's own start-up).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.base import LanguageModel, LMOutput
    from models.factory import build_model
    from models.moe import MoELayer, MoEStats

__all__ = ["LMOutput", "LanguageModel", "MoELayer", "MoEStats", "build_model"]

_HOME = {
    "LMOutput": "models.base",
    "LanguageModel": "models.base",
    "MoELayer": "models.moe",
    "MoEStats": "models.moe",
    "build_model": "models.factory",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
