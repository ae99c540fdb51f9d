"""The one training loop every variant and backbone runs through.

Seeded and deterministic on CPU; truncated BPTT with the recurrent state carried across windows
(reset at each epoch start); AdamW or SGD with warm-up and decay; gradient clipping; periodic
evaluation (with a hook a tuner can use to prune); final validation and test perplexity on the
full splits; periodic checkpoints from which an interrupted trial resumes bit-for-bit on CPU.
Host syncs happen only at logging steps, so bookkeeping stays off the hot path.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from harness.config import SpecError, TrialConfig
from harness.data import Corpus, batchify, get_batch
from harness.metrics import ResourceMonitor, RoutingTally, perplexity, utilisation_summary
from models import LanguageModel, LMOutput, build_model


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NullSink:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN or inf loss); the trial is failed, the study goes on."""


EvalHook = Callable[[int, int, float], None]
"""Called with (step, tokens seen, validation loss) after each evaluation; may raise to stop."""


@dataclass
class TrialResult:
    summary: dict[str, float]
    utilisation: pd.DataFrame  # split, layer, expert, share
    utilisation_history: pd.DataFrame  # step, tokens, layer, expert, share (training windows)
    model: LanguageModel | None = field(default=None, repr=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


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


def build_optimizer(model: nn.Module, config: TrialConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    o = config.optim
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


def optimisation_step(
    forward: Callable[..., LMOutput],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    state: Any,
    config: TrialConfig,
    device: torch.device,
) -> LMOutput:
    """Forward (under autocast), backward on LM + router losses, clip, update; returns the forward's output."""
    with autocast(device, config.train.precision):
        out = forward(x, y, state)
        loss = out.loss + out.aux_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.optim.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    optimizer.step()
    return out


def steps_per_epoch(n_columns: int, seq_len: int) -> int:
    return math.ceil((n_columns - 1) / seq_len)


def total_steps(config: TrialConfig, n_columns: int) -> int:
    per_epoch = steps_per_epoch(n_columns, config.train.seq_len)
    if config.budget.epochs is not None:
        return max(1, math.ceil(config.budget.epochs * per_epoch))
    per_step = config.train.batch_size * config.train.seq_len
    return max(1, math.ceil(config.budget.tokens / per_step))


def batches(rows: torch.Tensor, seq_len: int, max_tokens: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    limit = rows.size(1) - 1 if max_tokens is None else min(rows.size(1) - 1, math.ceil(max_tokens / rows.size(0)))
    for start in range(0, limit, seq_len):
        x, y = get_batch(rows, start, min(seq_len, limit - start))
        yield x, y


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    rows: torch.Tensor,
    config: TrialConfig,
    device: torch.device,
    max_tokens: int | None = None,
    tally: RoutingTally | None = None,
) -> float:
    """Mean next-token NLL over (the first ``max_tokens`` of) a batchified split."""
    was_training = model.training
    model.eval()
    state = model.initial_state(rows.size(0))
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for x, y in batches(rows, config.train.seq_len, max_tokens):
        with autocast(device, config.train.precision):
            out = model(x, y, state)
        state = out.state
        total += out.loss.double() * y.numel()
        count += y.numel()
        if tally is not None:
            tally.add(out.moe_stats)
    model.train(was_training)
    return float(total) / count


class Progress:
    """One status line: a live bar on a terminal, a line every ~10% otherwise."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.live = enabled and sys.stderr.isatty()
        self._last_decile = -1

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        done = step / self.total
        width = 24
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        line = (
            f"{self.label} [{bar}] {step}/{self.total} loss {loss:.3f} "
            f"ppl {perplexity(loss):.1f} {tokens_per_s:,.0f} tok/s"
        )
        if self.live:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif int(done * 10) > self._last_decile:
            self._last_decile = int(done * 10)
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            print(file=sys.stderr, flush=True)


class Checkpointer:
    """Atomic periodic checkpoints of everything a bit-exact resume needs."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path, self.fingerprint = path, fingerprint

    def save(self, payload: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"fingerprint": self.fingerprint, **payload}, partial)
        os.replace(partial, self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise SpecError(
                f"{self.path}: unreadable checkpoint ({type(error).__name__}); delete it to restart the trial"
            ) from None
        if payload.get("fingerprint") != self.fingerprint:
            raise SpecError(
                f"{self.path}: checkpoint was written for a different config; delete it to restart the trial"
            )
        return payload


def _long_table(fractions: torch.Tensor, **columns: Any) -> list[dict[str, Any]]:
    return [
        {**columns, "layer": layer, "expert": expert, "share": share}
        for layer, row in enumerate(fractions.cpu().tolist())
        for expert, share in enumerate(row)
    ]


def train(
    config: TrialConfig,
    corpus: Corpus,
    sink: MetricSink | None = None,
    *,
    on_eval: EvalHook | None = None,
    checkpoint: Checkpointer | None = None,
    progress: bool = True,
    label: str = "",
) -> TrialResult:
    """Train one trial to its budget and return its summary figures and utilisation tables."""
    sink = sink or NullSink()
    t = config.train
    set_threads(config)
    device = resolve_device(t.device)
    seed_everything(config.seed)
    train_rows = batchify(corpus.train, t.batch_size).to(device)
    val_rows = batchify(corpus.validation, t.eval_batch_size).to(device)
    test_rows = batchify(corpus.test, t.eval_batch_size).to(device)
    per_epoch = steps_per_epoch(train_rows.size(1), t.seq_len)
    n_steps = total_steps(config, train_rows.size(1))
    model = build_model(config.model, config.moe, corpus.vocab_size).to(device)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, n_steps, config))
    forward = torch.compile(model) if t.compile else model

    n_moe = len(model.moe_layers())
    n_experts = config.moe.routed_experts if n_moe else 0
    window = RoutingTally(n_moe, n_experts, device)
    train_counts = torch.zeros(n_moe, n_experts, device=device)
    history: list[dict[str, Any]] = []
    step, tokens, train_time, best_val = 0, 0, 0.0, math.inf
    state = None
    if checkpoint is not None and (saved := checkpoint.load()) is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        step, tokens, train_time, best_val = saved["step"], saved["tokens"], saved["train_time"], saved["best_val"]
        train_counts = saved["train_counts"].to(device)
        history = saved["history"]
        state = tuple(s.to(device) for s in saved["state"]) if saved["state"] else None

    every = config.budget.checkpoint_every_steps
    next_checkpoint = (step // every + 1) * every
    bar = Progress(label or f"{config.variant} seed={config.seed}", n_steps, progress)
    window_loss = torch.zeros((), device=device)
    window_aux = torch.zeros((), device=device)
    window_steps, window_tokens = 0, 0
    model.train()
    with ResourceMonitor(device) as monitor:
        started = time.perf_counter()
        while step < n_steps:
            position = step % per_epoch
            if position == 0 or state is None:
                state = model.initial_state(t.batch_size)
            x, y = get_batch(train_rows, position * t.seq_len, t.seq_len)
            out = optimisation_step(forward, model, optimizer, x, y, state, config, device)
            scheduler.step()
            state = model.detach_state(out.state)
            window_loss += out.loss.detach()
            window_aux += out.aux_loss.detach()
            window.add(out.moe_stats)
            window_steps += 1
            window_tokens += y.numel()
            step += 1
            tokens += y.numel()

            last = step == n_steps
            logged = step % config.budget.log_every_steps == 0 or last
            if logged:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                elapsed = now - started
                train_time += elapsed
                mean_loss = float(window_loss) / window_steps
                if not math.isfinite(mean_loss):
                    raise NonFiniteLoss(f"non-finite training loss at step {step}")
                metrics = {
                    "train_loss": mean_loss,
                    "train_ppl": perplexity(mean_loss),
                    "aux_loss": float(window_aux) / window_steps,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": window_tokens / elapsed,
                    "tokens": float(tokens),
                    **window.means(),
                }
                sink.log_metrics(metrics, step)
                if n_moe:
                    train_counts += window.counts
                    history.extend(_long_table(window.fractions(), step=step, tokens=tokens))
                bar.update(step, mean_loss, metrics["tokens_per_s"])
                window.reset()
                window_loss.zero_()
                window_aux.zero_()
                window_steps, window_tokens = 0, 0
                started = now  # the logging work above counts as training time (in the next window)

            paused = time.perf_counter()  # evaluation and checkpointing are not training time
            if step % config.budget.eval_every_steps == 0 and not last:
                val_loss = evaluate(model, val_rows, config, device, config.budget.eval_tokens)
                best_val = min(best_val, val_loss)
                sink.log_metrics({"val_loss": val_loss, "val_ppl": perplexity(val_loss)}, step)
                if on_eval is not None:
                    on_eval(step, tokens, val_loss)
            # Checkpoints fall on logging steps, where the window accumulators are empty, and come
            # after the metrics so far are in the sink's store: a resume repeats nothing and loses nothing.
            if checkpoint is not None and step >= next_checkpoint and logged and not last:
                next_checkpoint = (step // every + 1) * every
                if (sync := getattr(sink, "sync", None)) is not None:
                    sync()
                checkpoint.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state(),
                        **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                        "step": step,
                        "tokens": tokens,
                        "train_time": train_time,
                        "best_val": best_val,
                        "train_counts": train_counts.cpu(),
                        "history": history,
                        "state": [s.cpu() for s in state] if state is not None else [],
                    }
                )
            started += time.perf_counter() - paused
        bar.close()

        val_tally = RoutingTally(n_moe, n_experts, device)
        val_loss = evaluate(model, val_rows, config, device, tally=val_tally)
        best_val = min(best_val, val_loss)
        sink.log_metrics({"val_loss": val_loss, "val_ppl": perplexity(val_loss)}, step)
        if on_eval is not None:
            on_eval(step, tokens, val_loss)
        test_loss = evaluate(model, test_rows, config, device)

    summary: dict[str, float] = {
        "final_val_loss": val_loss,
        "final_val_ppl": perplexity(val_loss),
        "best_val_ppl": perplexity(best_val),
        "test_loss": test_loss,
        "test_ppl": perplexity(test_loss),
        "train_tokens": float(tokens),
        "train_time_s": train_time,
        "time_per_mtok_s": train_time / tokens * 1e6,
        "train_tokens_per_s": tokens / train_time,
        **{f"params_{k}": float(v) for k, v in model.param_counts().items()},
        **monitor.summary(),
    }
    utilisation = pd.DataFrame(columns=["split", "layer", "expert", "share"])
    if n_moe:
        train_fractions = train_counts / train_counts.sum(-1, keepdim=True).clamp_min(1.0)
        summary |= utilisation_summary(train_fractions, "util_train")
        summary |= utilisation_summary(val_tally.fractions(), "util_val")
        summary |= {f"val_{k}": v for k, v in val_tally.means().items()}
        utilisation = pd.DataFrame(
            _long_table(train_fractions, split="train") + _long_table(val_tally.fractions(), split="validation")
        )
    return TrialResult(summary, utilisation, pd.DataFrame(history), model)
