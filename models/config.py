"""The models' own configuration: what a backbone and its MoE layer need, and nothing else.

Typed and validated with pydantic; the harness embeds these in its trial config. This module (like
the whole ``models`` package) imports nothing from ``harness``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelError(ValueError):
    """A model configuration that cannot be built; the message is one line for the user."""


class StrictConfig(BaseModel):
    """Unknown keys, NaN/inf and wrongly typed assignments are errors, not silently kept. A field's docstring is
    its description (``FieldInfo.description``), from which the README's key table is generated."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


class ModelConfig(StrictConfig):
    backbone: Literal["lstm", "gpt"] = "lstm"
    ffn: Literal["moe", "dense", "none"] = "moe"
    """``dense``: one plain feed-forward block (``moe.d_hidden`` wide) wherever an MoE layer would sit;
    ``none``: no block at all (the backbone alone)."""
    block_init: Literal["default", "scaled", "zero"] = "scaled"
    """How the residual block's output projection starts (dense FFN, every expert bank, shared experts):
    ``scaled``: normal with std 0.02 / sqrt(2 * n_layers), as GPT-2's residual projections, bias zero;
    ``zero``: zero weight and bias (the block starts as the identity); ``default``: PyTorch's Linear init.
    Near-identity keeps a fresh block from destabilising the residual stream (under ``default`` the classic LSTM
    recipe's dense FFN diverged early)."""
    d_model: int = Field(200, ge=1)
    n_layers: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    tie_weights: bool = True
    output: Literal["full", "adaptive"] = "full"
    """``adaptive``: adaptive softmax (Grave et al. 2017) over frequency-sorted clusters."""
    adaptive_cutoffs: list[int] = [2000, 10000]
    output_prior: bool = True
    """The output layer has biases (the adaptive head's clusters too) that start at the log unigram frequencies
    of the train split, so a fresh model already predicts word frequencies (the unigram loss) and the
    backbone is left to learn context. Without it, AdamW (which moves every parameter by about ``lr`` a step)
    learns the frequencies faster by saturating the LSTM into a constant output than through a bias ten
    nats away, and the backbone stalls for good (``docs/backbone-stall.md``). ``false``: torch's head as is."""
    # GPT only
    max_len: int | None = Field(None, ge=1)
    """GPT: the longest sequence (learned positions, RoPE tables); a trial config sets it to ``train.seq_len``."""
    n_heads: int = Field(4, ge=1)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    position: Literal["learned", "rope"] = "learned"
    moe_every: int = Field(1, ge=1)
    """GPT: the MoE layer replaces the FFN in every ``moe_every``-th block (the last one included)."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.backbone == "gpt" and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.position == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError("model.position=rope needs an even head dimension")
        if self.output == "adaptive" and sorted(set(self.adaptive_cutoffs)) != self.adaptive_cutoffs:
            raise ValueError(f"model.adaptive_cutoffs={self.adaptive_cutoffs} must be strictly increasing")
        return self

    @property
    def residual_std(self) -> float | None:
        """The std of the block's output projection (``block_init``); None keeps PyTorch's init."""
        if self.block_init == "default":
            return None
        return 0.0 if self.block_init == "zero" else 0.02 / (2 * self.n_layers) ** 0.5


class MoEConfig(StrictConfig):
    n_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    router: Literal["noisy_topk", "switch", "softmax_topk", "aux_free"] = "noisy_topk"
    router_init: Literal["default", "zeros", "switch"] = "default"
    """``default``: zeros for noisy top-k (as Shazeer 2017), PyTorch's Linear init otherwise;
    ``switch``: truncated normal with std sqrt(0.1 / d_model) (Fedus et al.)."""
    jitter: float = Field(0.0, ge=0.0, lt=1.0)
    """Switch input jitter: multiply router input by U(1-jitter, 1+jitter) while training."""
    bias_update_rate: float = Field(0.001, ge=0.0)
    """``aux_free``: per-step selection-bias update b_i += rate * sign(mean_load - load_i)."""
    expert: Literal["mlp", "lora"] = "mlp"
    d_hidden: int = Field(400, ge=1)
    activation: Literal["relu", "gelu", "swiglu"] = "relu"
    granularity: int = Field(1, ge=1)
    """Fine-grained experts: n_experts*g experts of width d_hidden/g, top_k*g active."""
    n_shared_experts: int = Field(0, ge=0)
    capacity_factor: float | None = Field(None, gt=0.0)
    """``None`` is dropless; otherwise capacity = ceil(cf * k * T / E) slots per expert."""
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_base_trainable: bool = False
    balance_losses: list[Literal["cv2", "switch"]] = ["cv2"]
    aux_loss_coef: float = Field(0.01, ge=0.0)
    z_loss_coef: float = Field(0.0, ge=0.0)
    kernel: Literal["auto", "loop", "grouped_mm"] = "auto"
    """Expert matmuls: ``grouped_mm`` (torch's grouped GEMM, no host syncs), ``loop`` (one matmul per
    expert); ``auto``: grouped_mm on CUDA, the faster one measured on CPU (``models.experts.AUTO_CPU_KERNEL``)."""

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"moe.top_k={self.top_k} exceeds moe.n_experts={self.n_experts}")
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"moe.router=switch routes top-1, got moe.top_k={self.top_k}")
        if self.d_hidden % self.granularity:
            raise ValueError(f"moe.d_hidden={self.d_hidden} is not divisible by moe.granularity={self.granularity}")
        return self

    @property
    def routed_experts(self) -> int:
        return self.n_experts * self.granularity

    @property
    def routed_top_k(self) -> int:
        return self.top_k * self.granularity

    @property
    def expert_hidden(self) -> int:
        return self.d_hidden // self.granularity


def upcycle_mismatch(source: ModelConfig, source_moe: MoEConfig, target: ModelConfig, target_moe: MoEConfig) -> str:
    """Why a model of ``target`` cannot start from a trained dense model of ``source`` ('' when it can).

    Everything but the block must be the same architecture; MLP experts and the LoRA base copy the dense FFN,
    so their width and activation must match it."""
    if source.ffn != "dense":
        return f"the source has model.ffn={source.ffn}; only a dense FFN can be upcycled"
    if target.ffn == "none":
        return "model.ffn=none has no block to take the source's dense FFN"
    same = ModelConfig.model_fields.keys() - {"ffn", "block_init", "dropout"}
    for key in sorted(same):
        if getattr(source, key) != getattr(target, key):
            return f"model.{key}={getattr(target, key)!r} differs from the source's {getattr(source, key)!r}"
    if source_moe.activation != target_moe.activation:
        return f"moe.activation={target_moe.activation} differs from the source's {source_moe.activation}"
    width = target_moe.expert_hidden if target_moe.expert == "mlp" else target_moe.d_hidden
    if target.ffn == "moe" and width != source_moe.d_hidden:
        return f"the experts' width {width} differs from the source FFN's moe.d_hidden={source_moe.d_hidden}"
    if target.ffn == "dense" and target_moe.d_hidden != source_moe.d_hidden:
        return f"moe.d_hidden={target_moe.d_hidden} differs from the source's {source_moe.d_hidden}"
    return ""
