"""Routers: map tokens to (expert index, combine weight) pairs. All maths in float32.

- ``NoisyTopKRouter``: Shazeer et al. 2017 noisy top-k gating with the smooth load estimate.
- ``SwitchRouter``: Fedus et al. 2021 top-1, combine weight = router probability, optional jitter.
- ``SoftmaxTopKRouter``: Mixtral: softmax over all experts, top-k, renormalised over the k.
- ``AuxFreeRouter``: DeepSeek-V3 auxiliary-loss-free balancing: sigmoid affinities s_i, selection
  by top-k of s_i + b_i, combine weights the selected s_i (not s_i + b_i) normalised to sum to 1.
  Training-mode forwards only accumulate c_i, the slots routed to expert i; ``update_bias``, called
  once per optimiser step by the train step, applies b_i += rate * sign(mean_j c_j - c_i) under
  ``no_grad`` and resets c (outside forward, as in torchtitan, so gradient accumulation or activation
  recomputation cannot move the bias twice per step). Overloaded experts become less attractive,
  underloaded ones more; the bias only steers selection, so it never enters the gradient or the output scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import MoEConfig


@dataclass
class Routing:
    expert_index: Tensor  # [T, k] int64
    combine_weight: Tensor  # [T, k] float32
    probs: Tensor  # [T, E] float32 distribution over experts (for the Switch balance loss)
    logits: Tensor  # [T, E] float32 clean logits (for the z-loss)
    load: Tensor  # [E] float32 tokens per expert; differentiable for noisy top-k in training

    def dense_gates(self) -> Tensor:
        """``[T, E]`` combine weights, zero for unselected experts (for importance)."""
        gates = self.probs.new_zeros(self.probs.shape)
        return gates.scatter(1, self.expert_index, self.combine_weight)


def _selection_counts(index: Tensor, n_experts: int) -> Tensor:
    return torch.bincount(index.reshape(-1), minlength=n_experts).float()


class Router(nn.Module):
    def __init__(self, d_model: int, config: MoEConfig) -> None:
        super().__init__()
        self.n_experts = config.routed_experts
        self.top_k = config.routed_top_k
        self.gate = nn.Linear(d_model, self.n_experts, bias=False)
        if config.router_init == "zeros" or (config.router_init == "default" and config.router == "noisy_topk"):
            nn.init.zeros_(self.gate.weight)
        elif config.router_init == "switch":
            std = math.sqrt(0.1 / d_model)
            nn.init.trunc_normal_(self.gate.weight, std=std, a=-2 * std, b=2 * std)

    def router_linear(self, x: Tensor, weight: Tensor) -> Tensor:
        # Router precision is at least float32, even under bf16 autocast (Switch, ST-MoE).
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(dtype), weight.to(dtype))

    def clean_logits(self, x: Tensor) -> Tensor:
        return self.router_linear(x, self.gate.weight)

    def update_bias(self) -> None:
        """Once per optimiser step; only a router with a selection bias has anything to do."""


class NoisyTopKRouter(Router):
    def __init__(self, d_model: int, config: MoEConfig) -> None:
        super().__init__(d_model, config)
        self.noise = nn.Linear(d_model, self.n_experts, bias=False)
        nn.init.zeros_(self.noise.weight)

    def forward(self, x: Tensor) -> Routing:
        clean = self.clean_logits(x)
        noisy_training = self.training
        if noisy_training:
            # softplus(x W_noise) as in the paper; the floor keeps the CDF argument finite.
            noise_std = F.softplus(self.router_linear(x, self.noise.weight)) + 1e-2
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        k = self.top_k
        smooth_load = noisy_training and k < self.n_experts
        top_values, top_index = logits.topk(k + 1 if smooth_load else k, dim=-1)
        index, weight = top_index[:, :k], torch.softmax(top_values[:, :k], dim=-1)
        if smooth_load:
            # P(expert i stays in the top k if only its own noise were resampled), Shazeer eq. 8-9.
            threshold_in, threshold_out = top_values[:, k : k + 1], top_values[:, k - 1 : k]
            is_in = logits > threshold_in
            prob_in = torch.special.ndtr((clean - threshold_in) / noise_std)
            prob_out = torch.special.ndtr((clean - threshold_out) / noise_std)
            load = torch.where(is_in, prob_in, prob_out).sum(0)
        else:
            load = _selection_counts(index, self.n_experts)
        return Routing(index, weight, torch.softmax(logits, dim=-1), clean, load)


class SwitchRouter(Router):
    def __init__(self, d_model: int, config: MoEConfig) -> None:
        super().__init__(d_model, config)
        self.jitter = config.jitter

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.clean_logits(x)
        probs = torch.softmax(logits, dim=-1)
        weight, index = probs.max(dim=-1, keepdim=True)
        return Routing(index, weight, probs, logits, _selection_counts(index, self.n_experts))


class SoftmaxTopKRouter(Router):
    def forward(self, x: Tensor) -> Routing:
        logits = self.clean_logits(x)
        probs = torch.softmax(logits, dim=-1)
        top_probs, index = probs.topk(self.top_k, dim=-1)
        weight = top_probs / top_probs.sum(-1, keepdim=True)
        return Routing(index, weight, probs, logits, _selection_counts(index, self.n_experts))


class AuxFreeRouter(Router):
    def __init__(self, d_model: int, config: MoEConfig) -> None:
        super().__init__(d_model, config)
        self.update_rate = config.bias_update_rate
        self.register_buffer("selection_bias", torch.zeros(self.n_experts))
        # Slots routed to each expert since the last update_bias; zero between steps, so not checkpointed.
        self.register_buffer("load_seen", torch.zeros(self.n_experts), persistent=False)

    def forward(self, x: Tensor) -> Routing:
        logits = self.clean_logits(x)
        affinity = torch.sigmoid(logits)
        _, index = (affinity + self.selection_bias).topk(self.top_k, dim=-1)
        selected = affinity.gather(1, index)
        weight = selected / selected.sum(-1, keepdim=True)
        counts = _selection_counts(index, self.n_experts)
        if self.training:
            self.load_seen += counts
        probs = affinity / affinity.sum(-1, keepdim=True)
        return Routing(index, weight, probs, logits, counts)

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3's rule on the load seen since the last update: b_i += rate * sign(mean_j c_j - c_i)."""
        self.selection_bias += self.update_rate * torch.sign(self.load_seen.mean() - self.load_seen)
        self.load_seen.zero_()


ROUTERS: dict[str, type[Router]] = {
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "softmax_topk": SoftmaxTopKRouter,
    "aux_free": AuxFreeRouter,
}


def build_router(d_model: int, config: MoEConfig) -> Router:
    return ROUTERS[config.router](d_model, config)
