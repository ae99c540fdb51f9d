"""What every backbone shares: the output head, the forward contract, parameter accounting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig, ModelError
from models.experts import FeedForward
from models.moe import MoELayer, MoEStats

COMPONENTS = ("embedding", "backbone", "router", "experts", "ffn", "head")


@dataclass
class LMOutput:
    loss: Tensor  # mean next-token NLL (nats) over the batch
    aux_loss: Tensor  # weighted sum of every MoE layer's router losses
    state: Any = None  # recurrent state to carry to the next window (LSTM), else None
    moe_stats: list[MoEStats] = field(default_factory=list)
    backbone_output: Tensor | None = None  # (B, T, C) detached, before dropout: for token_spread at logging steps


@torch.no_grad()
def token_spread(hidden: Tensor) -> Tensor:
    """How much the backbone's output varies across the batch's tokens, relative to its size: the mean over
    channels of the standard deviation over tokens, divided by the root mean square. About 1 for a backbone
    whose output depends on its input; 0 when every token gets the same vector (saturated LSTM units or a
    collapsed representation), which passes nothing about the input to the head."""
    flat = hidden.detach().reshape(-1, hidden.size(-1)).float()  # (B*T, C)
    return flat.std(0).mean() / flat.square().mean().sqrt().clamp_min(1e-12)


def log_unigram(token_counts: Tensor) -> Tensor:
    """Log frequencies with add-one smoothing (a word that never occurs in train gets a finite bias)."""
    counts = token_counts.double() + 1.0
    return (counts / counts.sum()).log().float()


class OutputHead(nn.Module):
    """Full softmax (optionally tied to the embedding) or adaptive softmax (Grave et al. 2017). With ``bias``,
    the adaptive head and its tail clusters get biases (torch's have none), and :meth:`set_prior` starts the
    biases at the unigram distribution (``prior``); without, the head is torch's as is."""

    def __init__(self, model: ModelConfig, vocab_size: int, embedding: nn.Embedding) -> None:
        """The head ``model`` asks for (``output``, ``adaptive_cutoffs``, ``output_prior`` as ``bias``), tied to
        ``embedding`` when ``model.tie_weights``."""
        super().__init__()
        d_model, cutoffs, bias = model.d_model, model.adaptive_cutoffs, model.output_prior
        self.prior, self.adaptive = bias, None
        if model.output == "adaptive":
            usable = [c for c in cutoffs if 0 < c < vocab_size - 1]
            if not usable:
                raise ModelError(
                    f"model.adaptive_cutoffs={cutoffs} leave no tail cluster for a vocabulary of {vocab_size} words"
                )
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(d_model, vocab_size, usable, div_value=4.0, head_bias=bias)
            if bias:  # each tail cluster's output projection: the same weight, plus a bias
                for tail in self.adaptive.tail:
                    projection = nn.Linear(tail[1].in_features, tail[1].out_features)
                    projection.weight = tail[1].weight
                    tail[1] = projection
        else:
            self.proj = nn.Linear(d_model, vocab_size)
            if model.tie_weights:
                self.proj.weight = embedding.weight

    @torch.no_grad()
    def set_prior(self, log_prior: Tensor) -> None:
        """Start the biases so that, before the weights have any say, the head predicts ``log_prior``
        (log p(w), word ids sorted by frequency as the adaptive head's clusters need)."""
        if self.adaptive is None:
            self.proj.bias.copy_(log_prior)
            return
        head, edges = self.adaptive.head, self.adaptive.cutoffs  # cutoffs end with the vocabulary size
        clusters = [log_prior[lo:hi].logsumexp(0) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        head.bias.copy_(torch.cat([log_prior[: edges[0]], torch.stack(clusters)]))  # shortlist words, clusters
        for tail, lo, hi, mass in zip(self.adaptive.tail, edges[:-1], edges[1:], clusters, strict=True):
            tail[1].bias.copy_(log_prior[lo:hi] - mass)  # log p(w | cluster)

    def forward(self, hidden: Tensor, targets: Tensor) -> Tensor:
        hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
        if self.adaptive is not None:
            # fp32 even under bf16 autocast: torch's adaptive softmax mixes dtypes in index_copy_ there.
            with torch.autocast(hidden.device.type, enabled=False):
                return self.adaptive(hidden.float(), targets).loss
        return F.cross_entropy(self.proj(hidden).float(), targets)


class LanguageModel(nn.Module):
    """Contract for backbones: ``forward(inputs, targets, state) -> LMOutput``."""

    head: OutputHead

    def initial_state(self, batch_size: int) -> Any:
        return None

    def init_output_prior(self, token_counts: Tensor) -> None:
        """Start the output biases at the log unigram frequencies (``token_counts``: the train split's count
        of each word id); a no-op for a head built without biases (``model.output_prior: false``)."""
        if self.head.prior:
            self.head.set_prior(log_unigram(token_counts).to(next(self.head.parameters()).device))

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
        counts here), the output head, MoE routers, experts (routed and shared: an MoE layer's rest), a
        dense FFN block, and the backbone (everything else: LSTM, attention, norms)."""
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in COMPONENTS}
        owner: dict[int, str] = {}
        claims = [
            ("embedding", [m for m in self.modules() if isinstance(m, nn.Embedding)]),
            ("head", [m for m in self.modules() if isinstance(m, OutputHead)]),
            ("router", [layer.router for layer in self.moe_layers()]),
            ("experts", self.moe_layers()),  # routed and shared experts (the router claimed first)
            ("ffn", [m for m in self.modules() if isinstance(m, FeedForward)]),  # a dense FFN block
            ("backbone", [self]),
        ]
        for name, modules in claims:  # first claim wins: the tied weight is the embedding's
            for module in modules:
                for param in module.parameters():
                    if id(param) not in owner:
                        owner[id(param)] = name
                        groups[name].append(param)
        return groups
