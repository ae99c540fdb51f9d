"""A small pre-norm decoder-only transformer whose FFNs are MoE layers (every n-th block)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import LanguageModel, LMOutput, OutputHead
from models.config import ModelConfig, ModelError, MoEConfig
from models.moe import build_block, run_block


def rope_tables(length: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(length).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (x1, x2) of ``[B, H, S, D]`` by position-dependent angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    seq = x.size(-2)
    cos, sin = cos[:seq].to(x.dtype), sin[:seq].to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, rope: bool, max_len: int) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.rope = rope
        if rope:
            cos, sin = rope_tables(max_len, d_model // n_heads)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, model: ModelConfig, moe: MoEConfig, ffn: str, max_len: int) -> None:
        """``ffn``: this block's feed-forward sublayer, ``moe`` | ``dense`` | ``none`` (attention only)."""
        super().__init__()
        norm = nn.RMSNorm if model.norm == "rmsnorm" else nn.LayerNorm
        self.norm_attn = norm(model.d_model)
        self.attn = CausalSelfAttention(model.d_model, model.n_heads, model.dropout, model.position == "rope", max_len)
        self.ffn = build_block(model.d_model, ffn, moe, model.residual_std)
        self.norm_ffn = norm(model.d_model) if self.ffn is not None else None
        self.drop = nn.Dropout(model.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Any]:
        x = x + self.drop(self.attn(self.norm_attn(x)))  # (B, S, C)
        if self.ffn is None or self.norm_ffn is None:
            return x, None, None
        update, aux, stats = run_block(self.ffn, self.norm_ffn(x))
        return x + self.drop(update), aux, stats


def _block_ffn(model: ModelConfig, index: int) -> str:
    """Block ``index``'s sublayer: the MoE layer sits in every ``moe_every``-th block, dense FFNs between."""
    if model.ffn == "moe" and (index + 1) % model.moe_every:
        return "dense"
    return model.ffn


class GPTLanguageModel(LanguageModel):
    def __init__(self, model: ModelConfig, moe: MoEConfig, vocab_size: int) -> None:
        super().__init__()
        if model.max_len is None:
            raise ModelError("model.max_len is unset: the gpt backbone needs its longest sequence length")
        max_len = model.max_len
        self.embed = nn.Embedding(vocab_size, model.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Embedding(max_len, model.d_model) if model.position == "learned" else None
        self.drop = nn.Dropout(model.dropout)
        self.blocks = nn.ModuleList(Block(model, moe, _block_ffn(model, i), max_len) for i in range(model.n_layers))
        self.norm = nn.RMSNorm(model.d_model) if model.norm == "rmsnorm" else nn.LayerNorm(model.d_model)
        self.head = OutputHead(model, vocab_size, self.embed)

    def forward(self, inputs: Tensor, targets: Tensor, state: Any = None) -> LMOutput:
        x = self.embed(inputs)
        if self.pos is not None:
            x = x + self.pos(torch.arange(inputs.size(1), device=inputs.device))
        x = self.drop(x)
        aux, moe_stats = x.new_zeros((), dtype=torch.float32), []
        for block in self.blocks:
            x, block_aux, stats = block(x)
            if stats is not None:
                aux, moe_stats = aux + block_aux, moe_stats + [stats]
        hidden = self.norm(x)  # (B, S, C)
        return LMOutput(self.head(hidden, targets), aux, None, moe_stats, hidden.detach())
