"""One optimisation step, and the set-up it runs on: the trainer's loop and the bench's minimal loop
both build their state with ``build_train_state`` and advance it with ``train_step``, so the bench
times exactly the step the trainer runs."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from harness.checkpoint import TrainState
from harness.config import SpecError, TrialConfig
from models import LanguageModel, LMOutput, MoELayer, build_model
from models.upcycle import upcycle_state_dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA timing must not stop the clock before the kernels ran)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DEFAULT_THREADS = torch.get_num_threads()  # torch's choice for this machine, before any trial changes it


def set_threads(config: TrialConfig) -> None:
    """Intra-op threads for this trial; unset means torch's default (not the previous trial's)."""
    torch.set_num_threads(config.train.threads or DEFAULT_THREADS)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def build_optimizer(model: LanguageModel, config: TrialConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; with ``optim.block_lr_scale`` other than 1, the block's parameters (router, experts, a dense FFN)
    are a second group at the scaled learning rate, else all are one group."""
    o = config.optim
    params: list[nn.Parameter] | list[dict[str, object]] = [p for p in model.parameters() if p.requires_grad]
    if o.block_lr_scale != 1.0:
        groups = model.parameter_groups()
        block = {id(p) for name in ("router", "experts", "ffn") for p in groups[name]}
        rest, scaled = [p for p in params if id(p) not in block], [p for p in params if id(p) in block]
        params = [{"params": rest}, *([{"params": scaled, "lr": o.lr * o.block_lr_scale}] if scaled else [])]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=o.fused)


def lr_factor(step: int, total_steps: int, config: TrialConfig) -> float:
    """Linear warm-up, then constant, cosine or linear decay to ``min_lr_ratio``."""
    o = config.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1.0 - progress
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """What a step needs besides the state it advances."""

    forward: Callable[..., LMOutput]  # the model, or its torch.compile'd form
    device: torch.device
    precision: str  # fp32 | bf16 (autocast)
    grad_clip: float  # max gradient norm; 0 = no clipping
    moe_layers: list[MoELayer]  # whose routers update their biases once per step
    parameter_groups: dict[str, list[nn.Parameter]] = field(default_factory=dict)  # component -> parameters


@dataclass
class GradStats:
    """One step's gradient bookkeeping, all device tensors (reading them is the caller's host sync)."""

    clipped: Tensor | None  # () bool: the total norm exceeded grad_clip; None without clipping
    norms: dict[str, Tensor]  # grad_norm_<component> and grad_norm_total before clipping; only on measured steps


def gradient_norms(groups: dict[str, list[nn.Parameter]]) -> dict[str, Tensor]:
    """L2 norm of each component's gradient and of all of them (``grad_norm_<component>``, ``grad_norm_total``)."""
    grads = {name: [p.grad for p in params if p.grad is not None] for name, params in groups.items()}
    norms = {f"grad_norm_{name}": nn.utils.get_total_norm(g) for name, g in grads.items()}
    return norms | {"grad_norm_total": nn.utils.get_total_norm([g for group in grads.values() for g in group])}


def build_train_state(
    config: TrialConfig,
    token_counts: Tensor,
    device: torch.device,
    n_steps: int,
    initial_weights: dict[str, Tensor] | None = None,
) -> tuple[TrainState, StepContext]:
    """A fresh model, optimiser and ``n_steps`` learning-rate schedule (seed the RNGs first); the vocabulary is
    ``token_counts``' length, and its output biases start at their log frequencies (``model.output_prior``). The
    model starts from ``initial_weights`` (a dense model's, upcycled: ``models/upcycle.py``) when given."""
    model = build_model(config.model, config.moe, token_counts.numel(), token_counts=token_counts)
    if initial_weights is not None:
        model.load_state_dict(upcycle_state_dict(initial_weights, model))
    model = model.to(device)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, n_steps, config))
    moe_layers = model.moe_layers()
    counts = torch.zeros(len(moe_layers), config.moe.routed_experts if moe_layers else 0, device=device)
    forward = torch.compile(model) if config.train.compile else model
    groups = {  # trainable parameters per component; none for a component the model lacks (no router: no norm)
        name: trainable
        for name, params in model.parameter_groups().items()
        if (trainable := [p for p in params if p.requires_grad])
    }
    context = StepContext(
        forward=forward,
        device=device,
        precision=config.train.precision,
        grad_clip=config.optim.grad_clip,
        moe_layers=moe_layers,
        parameter_groups=groups,
    )
    return TrainState(model, optimizer, scheduler, device, counts), context


def train_step(
    state: TrainState, context: StepContext, x: Tensor, y: Tensor, measure: bool = False
) -> tuple[LMOutput, GradStats]:
    """Forward (under autocast) from the carried recurrent state, backward on LM + router losses, clip,
    update, learning-rate schedule, router biases; returns the forward's output and the gradient's stats:
    whether it was clipped (every step, a device tensor, no host sync) and, when ``measure`` (a logging
    step), the pre-clipping norm per component, so steps that do not log pay nothing for them."""
    with autocast(context.device, context.precision):
        out = context.forward(x, y, state.recurrent)  # x, y: (B, T)
        loss = out.loss + out.aux_loss
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norms = gradient_norms(context.parameter_groups) if measure else {}
    clipped = None
    if context.grad_clip:
        total = nn.utils.clip_grad_norm_(state.model.parameters(), context.grad_clip)  # () before clipping
        clipped = total > context.grad_clip
    state.optimizer.step()
    state.scheduler.step()
    for layer in context.moe_layers:
        layer.update_router_bias()
    state.recurrent = state.model.detach_state(out.state)
    state.step += 1
    state.tokens += y.numel()
    return out, GradStats(clipped, norms)
