"""What every backbone shares: the output head, the forward contract, parameter accounting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelError
from models.experts import FeedForward
from models.moe import MoELayer, MoEStats

COMPONENTS = ("embedding", "backbone", "router", "experts", "head")


@dataclass
class LMOutput:
    loss: Tensor  # mean next-token NLL (nats) over the batch
    aux_loss: Tensor  # weighted sum of every MoE layer's router losses
    state: Any = None  # recurrent state to carry to the next window (LSTM), else None
    moe_stats: list[MoEStats] = field(default_factory=list)


class OutputHead(nn.Module):
    """Full softmax (optionally tied to the embedding) or adaptive softmax (Grave et al. 2017)."""

    def __init__(self, d_model: int, vocab_size: int, kind: str, cutoffs: list[int], tied: nn.Embedding | None) -> None:
        super().__init__()
        self.adaptive = None
        if kind == "adaptive":
            usable = [c for c in cutoffs if 0 < c < vocab_size - 1]
            if not usable:
                raise ModelError(
                    f"model.adaptive_cutoffs={cutoffs} leave no tail cluster for a vocabulary of {vocab_size} words"
                )
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(d_model, vocab_size, usable, div_value=4.0)
        else:
            self.proj = nn.Linear(d_model, vocab_size)
            if tied is not None:
                self.proj.weight = tied.weight

    def forward(self, hidden: Tensor, targets: Tensor) -> Tensor:
        hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
        if self.adaptive is not None:
            # fp32 even under bf16 autocast: torch's adaptive softmax mixes dtypes in index_copy_ there.
            with torch.autocast(hidden.device.type, enabled=False):
                return self.adaptive(hidden.float(), targets).loss
        return F.cross_entropy(self.proj(hidden).float(), targets)


class LanguageModel(nn.Module):
    """Contract for backbones: ``forward(inputs, targets, state) -> LMOutput``."""

    def initial_state(self, batch_size: int) -> Any:
        return None

    def detach_state(self, state: Any) -> Any:
        return None

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def param_counts(self) -> dict[str, int]:
        """Total, trainable, and active per token (routed experts counted k times, not E)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        active = total
        for layer in self.moe_layers():
            active += layer.active_params() - sum(p.numel() for p in layer.parameters())
        return {"total": total, "trainable": trainable, "active": active}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter once, by component (``COMPONENTS``): embedding tables (a tied softmax weight
        counts here), the output head, MoE routers, experts (routed, shared, and any dense FFN block),
        and the backbone (everything else: LSTM, attention, norms)."""
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in COMPONENTS}
        owner: dict[int, str] = {}
        claims = [
            ("embedding", [m for m in self.modules() if isinstance(m, nn.Embedding)]),
            ("head", [m for m in self.modules() if isinstance(m, OutputHead)]),
            ("router", [layer.router for layer in self.moe_layers()]),
            ("experts", [m for m in self.modules() if isinstance(m, MoELayer | FeedForward)]),
            ("backbone", [self]),
        ]
        for name, modules in claims:  # first claim wins: the tied weight is the embedding's
            for module in modules:
                for param in module.parameters():
                    if id(param) not in owner:
                        owner[id(param)] = name
                        groups[name].append(param)
        return groups
