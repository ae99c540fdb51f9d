"""Experts: a dense FFN, a bank of MLP experts, and LoRA experts over one shared base FFN.

Expert banks take tokens already grouped by expert (see ``dispatch``) plus where the groups are,
and run them through a grouped kernel (``models.grouped``), so compute follows the active experts
only. ``forward_every_expert`` is the naive reference (tests and the benchmark baseline).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.config import MoEConfig
from models.grouped import FFN_KERNELS, LOW_RANK_KERNELS, ExpertGroups, activate

# ``moe.kernel: auto`` on CPU: the kernel ``harness bench moe`` measures faster there (README, "Expert kernels").
AUTO_CPU_KERNEL = "loop"


def resolve_kernel(requested: str, x: Tensor) -> str:
    """The kernel that runs for inputs like ``x``: ``auto`` is grouped_mm on CUDA. Not under torch.compile on
    CPU: there grouped_mm's fake-tensor kernel accepts only bf16 (torch 2.13), so the loop runs
    eagerly inside the compiled graph. grouped_mm has no float64, so that falls back to loop."""
    kernel = requested if requested != "auto" else ("grouped_mm" if x.is_cuda else AUTO_CPU_KERNEL)
    return "loop" if x.dtype == torch.float64 else kernel


def _autocast_operands(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast to the autocast dtype when autocast is on: the grouped kernels use ``out=`` matmuls,
    which autocast does not rewrite, so they must receive operands of one dtype."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def init_residual_output(weight: Tensor, bias: Tensor, std: float | None) -> None:
    """Start a residual block's output projection near identity (``ModelConfig.residual_std``): normal with
    ``std`` (zero when 0), bias zero; ``None`` leaves the layer's own init."""
    if std is None:
        return
    nn.init.zeros_(bias)
    if std == 0.0:
        nn.init.zeros_(weight)
    else:
        nn.init.normal_(weight, std=std)


def _in_width(d_hidden: int, activation: str) -> int:
    return 2 * d_hidden if activation == "swiglu" else d_hidden


class FeedForward(nn.Module):
    """d -> hidden -> d with the chosen activation (SwiGLU doubles the input projection)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str, residual_std: float | None = None) -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, _in_width(d_hidden, activation))
        self.w_out = nn.Linear(d_hidden, d_model)
        init_residual_output(self.w_out.weight, self.w_out.bias, residual_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


def _uniform_(weight: Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


class MLPExperts(nn.Module):
    """E independent FFNs stored as stacked weights ``[E, in, out]``."""

    def __init__(self, d_model: int, config: MoEConfig, residual_std: float | None = None) -> None:
        super().__init__()
        n, hidden = config.routed_experts, config.expert_hidden
        self.activation, self.kernel = config.activation, config.kernel
        self.w_in = nn.Parameter(torch.empty(n, d_model, _in_width(hidden, config.activation)))
        self.b_in = nn.Parameter(torch.empty(n, _in_width(hidden, config.activation)))
        self.w_out = nn.Parameter(torch.empty(n, hidden, d_model))
        self.b_out = nn.Parameter(torch.empty(n, d_model))
        for weight in (self.w_in, self.b_in):
            _uniform_(weight, d_model)
        for weight in (self.w_out, self.b_out):
            _uniform_(weight, hidden)
        init_residual_output(self.w_out, self.b_out, residual_std)

    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in (self.w_in, self.b_in, self.w_out, self.b_out))

    def forward(self, x_grouped: Tensor, groups: ExpertGroups) -> Tensor:
        operands = _autocast_operands(x_grouped, self.w_in, self.b_in, self.w_out, self.b_out)
        kernel = FFN_KERNELS[resolve_kernel(self.kernel, operands[0])]
        with torch.autocast(x_grouped.device.type, enabled=False):
            return kernel(*operands, groups, self.activation)

    def forward_every_expert(self, x: Tensor) -> Tensor:
        """``[T, E, d]``: every expert on every token (reference and naive baseline only)."""
        h = activate(torch.einsum("td,edh->teh", x, self.w_in) + self.b_in, self.activation)
        return torch.einsum("teh,ehd->ted", h, self.w_out) + self.b_out


class LoRAExperts(nn.Module):
    """Expert i(x) = base(x) + (alpha / r) * B_i A_i dropout(x), with one shared base FFN.

    The base is computed once for all tokens (``shared``); only the rank-r deltas are per expert.
    B starts at zero, so every expert equals the base at initialisation.
    """

    def __init__(self, d_model: int, config: MoEConfig, residual_std: float | None = None) -> None:
        super().__init__()
        n, rank = config.routed_experts, config.lora_rank
        self.base = FeedForward(d_model, config.d_hidden, config.activation, residual_std)
        self.base.requires_grad_(config.lora_base_trainable)
        self.scale, self.kernel = config.lora_alpha / rank, config.kernel
        self.dropout = nn.Dropout(config.lora_dropout)
        self.lora_a = nn.Parameter(torch.empty(n, d_model, rank))
        self.lora_b = nn.Parameter(torch.zeros(n, rank, d_model))
        _uniform_(self.lora_a, d_model)

    def params_per_expert(self) -> int:
        return self.lora_a[0].numel() + self.lora_b[0].numel()

    def shared(self, x: Tensor) -> Tensor:
        return self.base(x)

    def forward(self, x_grouped: Tensor, groups: ExpertGroups) -> Tensor:
        operands = _autocast_operands(self.dropout(x_grouped), self.lora_a, self.lora_b)
        kernel = LOW_RANK_KERNELS[resolve_kernel(self.kernel, operands[0])]
        with torch.autocast(x_grouped.device.type, enabled=False):
            return kernel(*operands, groups) * self.scale

    def forward_every_expert(self, x: Tensor) -> Tensor:
        delta = torch.einsum("td,edr,erk->tek", self.dropout(x), self.lora_a, self.lora_b) * self.scale
        return self.base(x).unsqueeze(1) + delta


def build_experts(d_model: int, config: MoEConfig, residual_std: float | None = None) -> MLPExperts | LoRAExperts:
    experts = LoRAExperts if config.expert == "lora" else MLPExperts
    return experts(d_model, config, residual_std)
