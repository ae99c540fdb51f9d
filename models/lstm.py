"""Stacked LSTM language model with the MoE layer between the LSTM and the softmax (Shazeer 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from models.base import LanguageModel, LMOutput, OutputHead
from models.config import ModelConfig, MoEConfig
from models.moe import build_block, run_block


class LSTMLanguageModel(LanguageModel):
    def __init__(self, model: ModelConfig, moe: MoEConfig, vocab_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, model.d_model)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.drop = nn.Dropout(model.dropout)
        self.lstm = nn.LSTM(
            model.d_model,
            model.d_model,
            model.n_layers,
            dropout=model.dropout if model.n_layers > 1 else 0.0,
            batch_first=True,
        )
        self.block = build_block(model.d_model, model.ffn, moe, model.residual_std)  # None: the backbone alone
        self.head = OutputHead(model, vocab_size, self.embed)

    def initial_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        weight = self.embed.weight
        shape = (self.lstm.num_layers, batch_size, self.lstm.hidden_size)
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def detach_state(self, state: Any) -> Any:
        return tuple(s.detach() for s in state)

    def forward(self, inputs: Tensor, targets: Tensor, state: Any = None) -> LMOutput:
        embedded = self.drop(self.embed(inputs))
        # On CPU the LSTM runs in fp32 even under bf16 autocast: oneDNN has no bf16 LSTM primitive on CPUs
        # without AVX512-BF16 ("could not create a primitive descriptor"). cuDNN runs it in bf16.
        with torch.autocast("cpu", enabled=False):  # CPU autocast only: a CUDA one stays on
            hidden, state = self.lstm(embedded, state)  # (B, T, C)
        backbone_output = hidden.detach()  # before dropout, whose zeros would spread even a constant output
        hidden = self.drop(hidden)
        aux, moe_stats = hidden.new_zeros((), dtype=torch.float32), []
        if self.block is not None:
            update, block_aux, stats = run_block(self.block, hidden)
            if stats is not None:
                aux, moe_stats = block_aux, [stats]
            hidden = hidden + self.drop(update)  # residual: tokens an expert drops pass through unchanged
        return LMOutput(self.head(hidden, targets), aux, state, moe_stats, backbone_output)
