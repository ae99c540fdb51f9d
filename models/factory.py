"""Build a language model from the models' own configs."""

from __future__ import annotations

from torch import Tensor

from models.base import LanguageModel
from models.config import ModelConfig, ModelError, MoEConfig
from models.gpt import GPTLanguageModel
from models.lstm import LSTMLanguageModel


def build_model(
    model: ModelConfig, moe: MoEConfig, vocab_size: int, *, token_counts: Tensor | None = None
) -> LanguageModel:
    """The language model ``model`` and ``moe`` describe, over ``vocab_size`` word ids.

    Pass ``token_counts`` (the train split's count of each word id) to get the model the harness trains: its
    output biases start at the log unigram frequencies (``model.output_prior``). Without them the output biases keep
    their default start, and AdamW then learns word frequencies by saturating an LSTM into a constant output (the
    stall in docs/backbone-stall.md)."""
    backbone = GPTLanguageModel if model.backbone == "gpt" else LSTMLanguageModel
    built = backbone(model, moe, vocab_size)
    if token_counts is not None:
        if token_counts.numel() != vocab_size:
            raise ModelError(f"token_counts has {token_counts.numel()} entries for a vocabulary of {vocab_size}")
        built.init_output_prior(token_counts)
    return built
