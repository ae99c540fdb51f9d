"""Load-balancing and router regularisation losses, each in its published form.

All compute in at least float32; none applies its coefficient (the MoE layer does).
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-10


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation, population variance / mean^2 (0 for a single value)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(correction=0) / (x.mean() ** 2 + _EPS)


def importance_load_loss(gates: Tensor, load: Tensor) -> Tensor:
    """Shazeer et al. 2017: CV^2(importance) + CV^2(load).

    ``gates`` is ``[T, E]`` with the combine weight of every selected expert (0 elsewhere);
    importance is its column sum. ``load`` is ``[E]``: the (smooth, differentiable while
    training with noise) number of tokens sent to each expert.
    """
    return cv_squared(gates.sum(0)) + cv_squared(load)


def switch_balance_loss(probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch/GShard E * sum_i f_i * P_i, normalised to 1 for a perfectly balanced router.

    ``probs``: ``[T, E]`` router softmax; ``expert_index``: ``[T, k]`` selected experts. f_i counts
    every selected slot (so top-k routing is handled) divided by T*k; P_i is the mean probability.
    """
    n_experts = probs.size(-1)
    counts = torch.bincount(expert_index.reshape(-1), minlength=n_experts).to(probs.dtype)
    fraction = counts / expert_index.numel()
    return n_experts * torch.sum(fraction * probs.mean(0))


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
