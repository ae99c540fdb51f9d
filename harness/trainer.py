"""The one training loop every variant and backbone runs through.

Seeded and deterministic on CPU; truncated BPTT with the recurrent state carried across windows
(reset at each epoch start); periodic evaluation (with a hook a tuner can use to prune); final
validation and test perplexity on the full splits; periodic checkpoints from which an interrupted
trial resumes bit-for-bit on CPU. The step itself is ``harness.step.train_step``; the state it
advances and checkpoints is ``harness.checkpoint.TrainState``. The loop's bookkeeping (losses, routing,
gradient figures) stays on the device between logging steps and is read to the host in one copy at each
(``LogWindow.close``), so it stays off the hot path.
"""
# Over 350 lines: the training loop and the window bookkeeping it reads top to bottom, kept in one place.

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from harness import interrupt
from harness.checkpoint import Checkpointer, CheckpointPolicy, TrainState
from harness.config import TrialConfig
from harness.data import Corpus, batchify, get_batch
from harness.metric_names import BACKBONE_SPREAD, TRAIN_LOSS, VAL_LOSS, VAL_PPL, VAL_SUBSET_LOSS, VAL_SUBSET_PPL
from harness.metrics import ResourceMonitor, RoutingTally, perplexity, utilisation_summary
from harness.step import (
    GradStats,
    autocast,
    build_train_state,
    resolve_device,
    seed_everything,
    set_threads,
    sync,
    train_step,
)
from models import LanguageModel, LMOutput
from models.base import token_spread

__all__ = ["Checkpointer", "MetricSink", "NonFiniteLoss", "NullSink", "TrialResult", "resolve_device", "train"]


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def sync(self) -> None:
        """Return once every metric logged so far is stored (called before each checkpoint)."""


class NullSink:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None

    def sync(self) -> None:
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


def steps_per_epoch(n_columns: int, seq_len: int) -> int:
    return math.ceil((n_columns - 1) / seq_len)


def total_steps(config: TrialConfig, n_columns: int) -> int:
    per_epoch = steps_per_epoch(n_columns, config.train.seq_len)
    if config.budget.epochs is not None:
        return max(1, math.ceil(config.budget.epochs * per_epoch))
    per_step = config.train.batch_size * config.train.seq_len
    return max(1, math.ceil(config.budget.tokens / per_step))


def batches(rows: Tensor, seq_len: int, max_tokens: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    limit = rows.size(1) - 1 if max_tokens is None else min(rows.size(1) - 1, math.ceil(max_tokens / rows.size(0)))
    for start in range(0, limit, seq_len):
        x, y = get_batch(rows, start, min(seq_len, limit - start))
        yield x, y


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    rows: Tensor,
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


@dataclass
class Validation:
    """Scores the validation split mid-run and at the end: logged, kept as best, offered to the pruning hook."""

    rows: Tensor
    config: TrialConfig
    sink: MetricSink
    on_eval: EvalHook | None

    def __call__(
        self, state: TrainState, max_tokens: int | None = None, tally: RoutingTally | None = None, curve: bool = True
    ) -> float:
        """The loss on (the first ``max_tokens`` of) the split; a point of the validation curve unless ``curve`` is
        False (the full split at the end of a run whose curve is the ``eval_tokens`` estimate: a summary figure)."""
        val_loss = evaluate(state.model, self.rows, self.config, state.device, max_tokens, tally)
        if max_tokens == self.config.budget.eval_tokens:  # the best is over the mid-run measure only
            state.best_val = min(state.best_val, val_loss)
        if not curve:
            return val_loss
        loss_name, ppl_name = (VAL_LOSS, VAL_PPL) if max_tokens is None else (VAL_SUBSET_LOSS, VAL_SUBSET_PPL)
        self.sink.log_metrics({loss_name: val_loss, ppl_name: perplexity(val_loss)}, state.step)
        if self.on_eval is not None:
            self.on_eval(state.step, state.tokens, val_loss)  # may raise (pruned)
        return val_loss


def _long_table(fractions: list[list[float]], **columns: Any) -> list[dict[str, Any]]:
    return [
        {**columns, "layer": layer, "expert": expert, "share": share}
        for layer, row in enumerate(fractions)
        for expert, share in enumerate(row)
    ]


def to_host(scalars: dict[str, Tensor], table: Tensor) -> tuple[dict[str, float], list[list[float]]]:
    """0-d device tensors and a ``[rows, columns]`` table in one device-to-host copy (float64 holds every
    float32 and bf16 value exactly, so the floats are those each tensor would read alone)."""
    flat = torch.cat([torch.stack([value.double() for value in scalars.values()]), table.double().flatten()])
    values, n = flat.tolist(), len(scalars)
    width = table.size(-1)
    rows = [values[n + row * width : n + (row + 1) * width] for row in range(table.size(0))]
    return dict(zip(scalars, values[:n], strict=True)), rows


class LogWindow:
    """The steps since the last logging step: losses, routing and clipped steps accumulate on device and are
    read to the host in one copy at close, with the logging step's own figures. ``clip_fraction`` is the share
    of the window's steps whose gradient was clipped; the ``grad_norm_*`` figures (before clipping) and
    ``backbone_spread`` (``models.base.token_spread``) are the values at the logging step, not window means."""

    def __init__(self, n_layers: int, n_experts: int, device: torch.device, drops: bool = False) -> None:
        self.drops = drops  # a capacity is set: the dropped fraction can be non-zero, so it is logged
        self.loss = torch.zeros((), device=device)
        self.aux = torch.zeros((), device=device)
        self.clipped = torch.zeros((), device=device)
        self.grad_norms: dict[str, Tensor] = {}
        self.backbone_output: Tensor | None = None
        self.routing = RoutingTally(n_layers, n_experts, device)
        self.steps, self.tokens = 0, 0

    def add(self, out: LMOutput, grads: GradStats, tokens: int) -> None:
        self.loss += out.loss.detach()
        self.aux += out.aux_loss.detach()
        if grads.clipped is not None:
            self.clipped += grads.clipped
        self.grad_norms = grads.norms or self.grad_norms
        self.backbone_output = out.backbone_output
        self.routing.add(out.moe_stats)
        self.steps += 1
        self.tokens += tokens

    def step_figures(self) -> dict[str, Tensor]:
        """``clip_fraction``, and the logging step's ``grad_norm_*`` and ``backbone_spread``, still on the device."""
        figures = {"clip_fraction": self.clipped / self.steps, **self.grad_norms}
        if self.backbone_output is not None:  # computed here, not every step: only logging steps read it
            figures[BACKBONE_SPREAD] = token_spread(self.backbone_output)
        return figures

    def close(self, state: TrainState, elapsed: float) -> dict[str, float]:
        """The window's metrics (one device-to-host copy); its time and routing join the run's totals; then it
        is empty."""
        state.train_time += elapsed
        routing, figures = self.routing.sums(), self.step_figures()
        router_loss = {"aux_loss": self.aux} if self.routing.n_layers else {}  # no router, no router loss
        sums = {TRAIN_LOSS: self.loss, **router_loss, **routing}
        host, fractions = to_host(sums | figures, self.routing.fractions())
        mean_loss = host[TRAIN_LOSS] / self.steps
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(f"non-finite training loss at step {state.step}")
        metrics = {
            TRAIN_LOSS: mean_loss,
            "train_ppl": perplexity(mean_loss),
            **{name: host[name] / self.steps for name in router_loss},
            "lr": state.scheduler.get_last_lr()[0],
            "tokens_per_s": self.tokens / elapsed,
            "tokens": float(state.tokens),
            **{name: host[name] / self.routing.calls for name in routing},
            **{name: host[name] for name in figures},
        }
        if not self.drops:
            metrics.pop("dropped_fraction", None)
        if self.routing.n_layers:
            state.train_counts += self.routing.counts
            state.history.extend(_long_table(fractions, step=state.step, tokens=state.tokens))
        self.routing.reset()
        self.loss.zero_()
        self.aux.zero_()
        self.clipped.zero_()
        self.grad_norms = {}
        self.steps, self.tokens = 0, 0
        return metrics


class TrainClock:
    """Training wall time, lap by lap; time inside ``with clock.paused(phase):`` (evaluation, checkpoints) is left
    out, and summed per phase in ``phases`` (seconds)."""

    def __init__(self, device: torch.device, now: Callable[[], float] = time.perf_counter) -> None:
        self.device, self.now = device, now
        self.mark, self.pause_start = now(), 0.0
        self.phases: dict[str, float] = {}
        self.phase = ""

    def lap(self) -> float:
        """Seconds of training since the last lap (after the device has finished the queued work)."""
        sync(self.device)
        now = self.now()
        elapsed, self.mark = now - self.mark, now
        return elapsed

    def paused(self, phase: str) -> TrainClock:
        self.phase = phase
        return self  # a plain context manager: entered every step, so no generator-based one

    def __enter__(self) -> None:
        self.pause_start = self.now()

    def __exit__(self, *exc: object) -> None:
        paused = self.now() - self.pause_start
        self.mark += paused
        self.phases[self.phase] = self.phases.get(self.phase, 0.0) + paused


class _Lines:
    """tqdm's output off a terminal (a log file, a pipe): each refresh on its own line, no carriage returns."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if line := text.strip("\r\n").rstrip():
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(label: str, total: int, step: int, enabled: bool) -> tqdm:
    """One line per trial: a live bar on a terminal, a line about every 10% of the steps otherwise."""
    common = {"total": total, "initial": step, "desc": label, "disable": not enabled, "unit": "step"}
    if sys.stderr.isatty():
        return tqdm(**common, dynamic_ncols=True)
    # maxinterval=inf: tqdm's monitor thread would otherwise force a line after 10 idle seconds (a slow step)
    # and drop miniters to 1, printing every step from then on.
    lines = {"mininterval": 0, "maxinterval": float("inf"), "miniters": max(1, total // 10)}
    return tqdm(**common, file=_Lines(sys.stderr), **lines)


def show(bar: tqdm, step: int, metrics: dict[str, float]) -> None:
    loss, tokens_per_s = metrics[TRAIN_LOSS], metrics["tokens_per_s"]
    bar.set_postfix_str(f"loss {loss:.3f} ppl {perplexity(loss):.1f} {tokens_per_s:,.0f} tok/s", refresh=False)
    bar.update(step - bar.n)


def trial_result(
    config: TrialConfig,
    state: TrainState,
    val_loss: float,
    test_loss: float,
    val_tally: RoutingTally,
    resources: dict[str, float],
) -> TrialResult:
    """Summary figures and the utilisation tables of a finished run."""
    drops = config.moe.capacity_factor is not None  # else the dropped fraction is 0 by construction
    summary: dict[str, float] = {
        "final_val_loss": val_loss,
        "final_val_ppl": perplexity(val_loss),
        "test_loss": test_loss,
        "test_ppl": perplexity(test_loss),
        "train_tokens": float(state.tokens),
        "train_time_s": state.train_time,
        "time_per_mtok_s": state.train_time / state.tokens * 1e6,
        "train_tokens_per_s": state.tokens / state.train_time,
        **{f"params_{k}": float(v) for k, v in state.model.param_counts().items()},
        **resources,
    }
    if math.isfinite(state.best_val):  # named by the measure the mid-run evaluations use
        subset = config.budget.eval_tokens is not None
        summary["best_val_subset_ppl" if subset else "best_val_ppl"] = perplexity(state.best_val)
    utilisation = pd.DataFrame(columns=["split", "layer", "expert", "share"])
    if state.train_counts.numel():
        train_fractions = state.train_counts / state.train_counts.sum(-1, keepdim=True).clamp_min(1.0)
        summary |= utilisation_summary(train_fractions, "util_train")
        summary |= utilisation_summary(val_tally.fractions(), "util_val")
        summary |= {f"val_{k}": v for k, v in val_tally.means().items() if k != "dropped_fraction" or drops}
        utilisation = pd.DataFrame(
            _long_table(train_fractions.tolist(), split="train")
            + _long_table(val_tally.fractions().tolist(), split="validation")
        )
    return TrialResult(summary, utilisation, pd.DataFrame(state.history), state.model)


def train(
    config: TrialConfig,
    corpus: Corpus,
    sink: MetricSink | None = None,
    *,
    on_eval: EvalHook | None = None,
    checkpoint: Checkpointer | None = None,
    progress: bool = True,
    label: str = "",
    initial_weights: dict[str, Tensor] | None = None,
) -> TrialResult:
    """Train one trial to its budget and return its summary figures and utilisation tables; the model starts
    from ``initial_weights`` (upcycled from a dense model's) when given."""
    started, sink, t, b = time.perf_counter(), sink or NullSink(), config.train, config.budget
    set_threads(config)
    device = resolve_device(t.device)
    seed_everything(config.seed)
    train_rows = batchify(corpus.train, t.batch_size).to(device)  # (B, columns)
    test_rows = batchify(corpus.test, t.eval_batch_size).to(device)
    validate = Validation(batchify(corpus.validation, t.eval_batch_size).to(device), config, sink, on_eval)
    per_epoch, n_steps = steps_per_epoch(train_rows.size(1), t.seq_len), total_steps(config, train_rows.size(1))
    state, context = build_train_state(config, corpus.train_counts(), device, n_steps, initial_weights)
    if checkpoint is not None:
        checkpoint.restore(state)
    checkpoints = CheckpointPolicy(checkpoint, b.checkpoint_every_steps, state.step)
    window = LogWindow(*state.train_counts.shape, device, drops=config.moe.capacity_factor is not None)
    state.model.train()
    with ResourceMonitor(device) as monitor:
        with progress_bar(label or f"{config.variant} seed={config.seed}", n_steps, state.step, progress) as bar:
            setup_s, clock = time.perf_counter() - started, TrainClock(device)  # data on device, model, restore
            while state.step < n_steps:
                interrupt.check()  # Ctrl-C/SIGTERM: stop here, between steps (the last checkpoint stays)
                position = state.step % per_epoch
                if position == 0 or state.recurrent is None:  # each epoch starts from a fresh recurrent state
                    state.recurrent = state.model.initial_state(t.batch_size)
                x, y = get_batch(train_rows, position * t.seq_len, t.seq_len)  # (B, T) each
                logged = (state.step + 1) % b.log_every_steps == 0 or state.step + 1 == n_steps
                out, grads = train_step(state, context, x, y, measure=logged)
                window.add(out, grads, y.numel())
                last = state.step == n_steps
                if logged:
                    metrics = window.close(state, clock.lap())  # the logging work counts in the next window
                    sink.log_metrics(metrics, state.step)
                    show(bar, state.step, metrics)
                subset_ends = last and b.eval_tokens is not None  # the estimate's curve ends where training does
                if (state.step % b.eval_every_steps == 0 and not last) or subset_ends:
                    with clock.paused("eval"):
                        validate(state, b.eval_tokens)
                with clock.paused("checkpoint"):
                    checkpoints.maybe_save(state, logged, last, sink.sync)
        with clock.paused("final_eval"):
            val_tally = RoutingTally(*state.train_counts.shape, device)
            val_loss = validate(state, tally=val_tally, curve=b.eval_tokens is None)  # the full split
            test_loss = evaluate(state.model, test_rows, config, device)
    phases = {f"time_{phase}_s": seconds for phase, seconds in ({"setup": setup_s} | clock.phases).items()}
    return trial_result(config, state, val_loss, test_loss, val_tally, monitor.summary() | phases)
