"""Build a language model from the models' own configs."""

from __future__ import annotations

from models.base import LanguageModel
from models.config import ModelConfig, MoEConfig
from models.gpt import GPTLanguageModel
from models.lstm import LSTMLanguageModel


def build_model(model: ModelConfig, moe: MoEConfig, vocab_size: int) -> LanguageModel:
    backbone = GPTLanguageModel if model.backbone == "gpt" else LSTMLanguageModel
    return backbone(model, moe, vocab_size)
