"""MoE layers and the language-model backbones that host them."""

from __future__ import annotations

from harness.config import TrialConfig
from models.base import LanguageModel, LMOutput
from models.gpt import GPTLanguageModel
from models.lstm import LSTMLanguageModel
from models.moe import MoELayer, MoEStats

__all__ = ["LMOutput", "LanguageModel", "MoELayer", "MoEStats", "build_model"]


def build_model(config: TrialConfig, vocab_size: int) -> LanguageModel:
    backbone = GPTLanguageModel if config.model.backbone == "gpt" else LSTMLanguageModel
    return backbone(config, vocab_size)
