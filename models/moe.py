"""The MoE layer: router -> dispatch -> experts -> combine, plus its losses and routing statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models import losses
from models.config import MoEConfig
from models.dispatch import capacity_for, combine, expert_counts, gather_rows, kept_weight_sum, plan_dispatch
from models.experts import FeedForward, LoRAExperts, build_experts
from models.routers import build_router


@dataclass
class MoEStats:
    """Detached per-call routing statistics (tensors stay on device; no host sync)."""

    counts: Tensor  # [E] selected slots per expert
    loss_terms: dict[str, Tensor]  # unweighted: balance_cv2, balance_switch, z
    entropy: Tensor  # mean per-token routing entropy (nats)
    dropped_fraction: Tensor  # () share of routed slots dropped by the capacity (0 when dropless)


class MoELayer(nn.Module):
    def __init__(self, d_model: int, config: MoEConfig, residual_std: float | None = None) -> None:
        super().__init__()
        self.config = config
        self.n_experts = config.routed_experts
        self.top_k = config.routed_top_k
        self.router = build_router(d_model, config)
        self.experts = build_experts(d_model, config, residual_std)
        self.shared_experts = (
            FeedForward(d_model, config.n_shared_experts * config.expert_hidden, config.activation, residual_std)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, MoEStats]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens)
        capacity = capacity_for(tokens.size(0), self.n_experts, self.top_k, self.config.capacity_factor)
        plan = plan_dispatch(routing.expert_index, self.n_experts, capacity)
        expert_out = self.experts(gather_rows(tokens, plan), plan.groups)
        out = combine(expert_out, plan, routing.combine_weight)
        if isinstance(self.experts, LoRAExperts):
            # sum_k w_k (base(x) + delta_k(x)) = (sum_k w_k) base(x) + sum_k w_k delta_k(x)
            out = out + kept_weight_sum(plan, routing.combine_weight).unsqueeze(-1).to(out.dtype) * self.experts.shared(
                tokens
            )
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)

        cfg = self.config
        weights = {"z": cfg.z_loss_coef, **{f"balance_{name}": cfg.aux_loss_coef for name in cfg.balance_losses}}
        term_fns = {
            "balance_cv2": lambda: losses.importance_load_loss(routing.dense_gates(), routing.load),
            "balance_switch": lambda: losses.switch_balance_loss(routing.probs, routing.expert_index),
            "z": lambda: losses.router_z_loss(routing.logits),
        }
        # Every term is logged; only the weighted ones join the loss, so only they record a graph.
        terms: dict[str, Tensor] = {}
        aux = routing.logits.new_zeros(())
        for name, term_fn in term_fns.items():
            weight = weights.get(name, 0.0)
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
                terms[name] = term_fn()
            if weight > 0:
                aux = aux + weight * terms[name]
        probs = routing.probs.detach()
        stats = MoEStats(
            counts=expert_counts(routing.expert_index, self.n_experts).detach(),
            loss_terms={k: v.detach() for k, v in terms.items()},
            entropy=-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean(),
            dropped_fraction=plan.dropped_fraction,
        )
        return out.reshape(shape), aux, stats

    def update_router_bias(self) -> None:
        """Once per optimiser step, after the update (the aux-free router's bias; a no-op for the others)."""
        self.router.update_bias()

    def active_params(self) -> int:
        """Parameters one token touches: router, shared parts, and k routed experts."""
        total = sum(p.numel() for p in self.router.parameters())
        if isinstance(self.experts, LoRAExperts):
            total += sum(p.numel() for p in self.experts.base.parameters())
        if self.shared_experts is not None:
            total += sum(p.numel() for p in self.shared_experts.parameters())
        return total + self.top_k * self.experts.params_per_expert()


def build_block(d_model: int, kind: str, config: MoEConfig, residual_std: float | None) -> nn.Module | None:
    """The residual block a backbone hosts (``ModelConfig.ffn``): an MoE layer, a dense FFN, or none."""
    if kind == "none":
        return None
    if kind == "dense":
        return FeedForward(d_model, config.d_hidden, config.activation, residual_std)
    return MoELayer(d_model, config, residual_std)


def run_block(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None, MoEStats | None]:
    """The block's update of ``x`` (same shape), its router loss and routing statistics (None for a dense FFN)."""
    if isinstance(block, MoELayer):
        return block(x)
    return block(x), None, None
