"""Training health: is a trial's result a measurement of its design, or an artefact of a broken run?

A trial is judged from what MLflow holds (its step metrics and summary), by :func:`judge`, a pure
function, so the report can re-judge any stored run and tests can feed constructed histories. Four
detectors, each with its evidence:

* **stalled**: the train loss never leaves the unigram plateau (a model that learned only word
  frequencies sits at the unigram entropy of the training split).
* **saturated**: the backbone's output no longer depends on its input (``backbone_spread`` near 0 over the
  second half): saturated LSTM units pass no gradient to the embedding, so whatever the trial learns, a
  block on top of the backbone learns it from a constant (``docs/backbone-stall.md``).
* **collapsed**: validation routing has dead experts, or one expert is chosen for most tokens.
* **unstable**: the train loss is above the uniform loss ln V after warm-up, a gradient norm is not
  finite, or nearly every step is clipped by a gradient far above the bound while the loss does not improve.

A trial gets the tags :data:`HEALTH` (``ok`` or the comma-joined flags) and :data:`HEALTH_EVIDENCE`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from harness.metric_names import BACKBONE_SPREAD, TRAIN_LOSS
from harness.tags import HEALTH, HEALTH_EVIDENCE

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from harness.data import Corpus


UNTRAINED = frozenset({"saturated", "stalled", "unstable"})  # verdicts whose trial says nothing of its design


def is_result(status: str, health: str | None) -> bool:
    """Whether a trial's figures stand for its design: it finished and was not flagged untrained (collapsed routing
    alone is a property of the design and stays in). The one rule behind the study run's per-variant means, the
    report's tables and tests, and the seeds a sequential design counts. ``health``: the ``harness.health`` tag."""
    return status == "FINISHED" and not set(str(health or "ok").split(",")) & UNTRAINED


STALL_AFTER_SHARE = 0.5
"""Share of the budget after which a trial must have left the unigram plateau (the shipped studies' healthy
trials are well below it by then; a stalled one stays on it to the end)."""
STALL_MARGIN = 0.05
"""Stalled while the best train loss from ``STALL_AFTER_SHARE`` on is above (1 - margin) x unigram entropy."""
DEAD_EXPERT_FACTOR = 0.1
"""An expert is dead below a tenth of the uniform share 1/E (ST-MoE reports balanced routers within a few x of
uniform, so a tenth is far outside normal imbalance)."""
DOMINANT_SHARE = 0.5
"""Collapse onto one expert: it is chosen for more than half of the tokens (its share of the routed slots x the
slots per token, top-k), and it takes more than twice its uniform share of the slots (so two experts top-1 need
the dead-expert rule instead)."""
SATURATED_SPREAD = 0.01
"""A backbone is saturated while the median ``backbone_spread`` of the second half is below this: a trained
LSTM's output varies across tokens by about its own size, a saturated one by orders of magnitude less
(docs/backbone-stall.md has the measured figures on either side of the bound)."""
WARMUP_SHARE = 0.1
"""After this share of the budget the train loss must stay below ln V (the loss of a uniform guess)."""
UNIFORM_MARGIN = 0.02
"""A random init's loss sits at about ln V, slightly above it; only a loss this far above counts as divergence."""
CLIP_SATURATED = 0.95
"""Clip rate that means the gradient is always at the clipping bound. The classic LSTM recipe (clip 0.25)
clips most steps on a healthy, falling loss, so a high clip rate alone is not instability."""
MIN_IMPROVEMENT = 0.01
"""A saturated clip rate is unstable only when the mean train loss of the last quarter of the budget is less
than 1% below that of the third quarter..."""
CLIP_HOLDING = 10.0
"""...and the median gradient norm before clipping over the second half is at least this many times the clip
bound: each step then moves a tenth of what the gradient asks, the clip is holding down a blow-up. A clip a
little below the gradient is normal: healthy upcycled continuations clip every step a little above the bound
on a loss that a short continuation barely moves."""


def unigram_entropy(tokens: torch.Tensor, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that predicts every word by its frequency."""
    p = torch.bincount(tokens.reshape(-1), minlength=vocab_size).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def reference_summary(corpus: Corpus, grad_clip: float | None) -> dict[str, float]:
    """What a trial is judged against: the unigram entropy of the train split, ln V, and the clip bound. A trial
    run records the first two as params (constants of its data, not figures of the run)."""
    return {
        "health_unigram_loss": unigram_entropy(corpus.train, corpus.vocab_size),
        "health_uniform_loss": math.log(corpus.vocab_size),
        **({"health_grad_clip": grad_clip} if grad_clip else {}),
    }


@dataclass(frozen=True)
class HealthVerdict:
    flags: tuple[str, ...]  # sorted subset of collapsed, saturated, stalled, unstable; empty when healthy
    evidence: str

    @property
    def label(self) -> str:
        return ",".join(self.flags) or "ok"

    def tags(self) -> dict[str, str]:
        return {HEALTH: self.label, HEALTH_EVIDENCE: self.evidence}


Points = Sequence[tuple[int, float]]  # (step, value) at each logging step, in step order


def clip_fraction_over(points: Points, after: float = 0) -> float:
    """Share of clipped steps in the logging windows that end after step ``after`` (0: the whole run), from
    each window's ``clip_fraction`` (a window runs from the previous logging step to its own)."""
    clipped, steps, previous = 0.0, 0, 0
    for step, fraction in points:
        if step > after:
            clipped, steps = clipped + fraction * (step - previous), steps + step - previous
        previous = step
    return clipped / steps if steps else 0.0


def stalled(losses: Points, unigram: float) -> str | None:
    last = losses[-1][0]
    late = [loss for step, loss in losses if step >= STALL_AFTER_SHARE * last]
    best = min(late)
    if best <= unigram * (1 - STALL_MARGIN):
        return None
    gap = abs(best - unigram) / unigram
    where = f"{gap:.1%} above" if best > unigram else f"within {gap:.1%} of"
    return f"train loss {best:.2f} {where} unigram {unigram:.2f} from {STALL_AFTER_SHARE:.0%} of budget"


def saturated(history: Mapping[str, Points]) -> str | None:
    """The backbone's output is (nearly) the same for every token over the second half of the budget."""
    spreads = history.get(BACKBONE_SPREAD, [])
    if not spreads:  # a run from before the spread was logged
        return None
    last = spreads[-1][0]
    spread = statistics.median(value for step, value in spreads if step >= last / 2)
    if spread >= SATURATED_SPREAD:
        return None
    return (
        f"backbone output spread across tokens {spread:.2g} (median over the second half, < {SATURATED_SPREAD:g}): "
        "its units are saturated into a constant output, so no gradient reaches the embedding"
    )


def collapsed(summary: Mapping[str, float]) -> str | None:
    """Dead or dominant experts in any MoE layer's validation shares of routed slots (``util_val_l<layer>_e<expert>``;
    ``health_top_k`` slots per token, 1 when absent)."""
    top_k = summary.get("health_top_k", 1.0)
    layers: dict[str, list[float]] = {}
    for key, share in summary.items():
        if key.startswith("util_val_l") and "_e" in key:
            layers.setdefault(key.removeprefix("util_val_").split("_e")[0], []).append(share)
    found = []
    for layer, shares in sorted(layers.items()):
        n = len(shares)
        dead = [s for s in shares if s < DEAD_EXPERT_FACTOR / n]
        if dead:
            found.append(f"{layer}: {len(dead)} of {n} experts dead (share < {DEAD_EXPERT_FACTOR / n:.3g})")
        if max(shares) * top_k > DOMINANT_SHARE and max(shares) > 2 / n:
            found.append(f"{layer}: one expert is chosen for {min(1.0, max(shares) * top_k):.0%} of the tokens")
    if not found:
        return None
    top = sorted((s for shares in layers.values() for s in shares), reverse=True)[:2]
    return "; ".join(found) + f" (top shares {' / '.join(f'{s:.2f}' for s in top)})"


def unstable(history: Mapping[str, Points], uniform: float, grad_clip: float | None) -> str | None:
    losses = history[TRAIN_LOSS]
    last = losses[-1][0]
    for name in (TRAIN_LOSS, "grad_norm_total"):
        bad = [step for step, value in history.get(name, []) if not math.isfinite(value)]
        if bad:
            return f"non-finite {name} at step {bad[0]}"
    high = [
        (step, loss) for step, loss in losses if step > WARMUP_SHARE * last and loss > uniform * (1 + UNIFORM_MARGIN)
    ]
    if high:
        step, loss = max(high, key=lambda point: point[1])
        return f"train loss {loss:.2f} above ln V = {uniform:.2f} at step {step} (after warm-up)"
    return clipped_flat(history, grad_clip)


def clipped_flat(history: Mapping[str, Points], grad_clip: float | None) -> str | None:
    """Nearly every second-half step clipped, by a gradient ``CLIP_HOLDING`` x the bound, on a flat loss."""
    losses = history[TRAIN_LOSS]
    last = losses[-1][0]
    norms = [norm for step, norm in history.get("grad_norm_total", []) if step >= last / 2]
    if grad_clip is None or not norms:  # not clipped, or a run from before the gradient norms were logged
        return None
    rate, norm = clip_fraction_over(history.get("clip_fraction", []), after=last / 2), statistics.median(norms)
    third = [loss for step, loss in losses if last / 2 <= step < 3 * last / 4] or [losses[-1][1]]
    fourth = [loss for step, loss in losses if step >= 3 * last / 4]
    before, after = sum(third) / len(third), sum(fourth) / len(fourth)  # quarter means: one window is noisy
    if rate >= CLIP_SATURATED and norm >= CLIP_HOLDING * grad_clip and after > before * (1 - MIN_IMPROVEMENT):
        return (
            f"{rate:.0%} of second-half steps clipped at {norm / grad_clip:.0f}x the bound {grad_clip:g} "
            f"(median gradient norm {norm:.3g}) while mean train loss went {before:.2f} -> {after:.2f}"
        )
    return None


def judge(history: Mapping[str, Points], summary: Mapping[str, float]) -> HealthVerdict:
    """The verdict on a finished trial from its step metrics (``TRAIN_LOSS``, ``grad_norm_total``,
    ``clip_fraction``, ``backbone_spread``: (step, value) in step order) and summary (the ``health_*`` references of
    :func:`reference_summary` and the validation shares ``util_val_l<layer>_e<expert>``, see
    :func:`validation_shares`)."""
    losses = history[TRAIN_LOSS]
    if not losses:
        return HealthVerdict((), "no training loss logged")
    unigram, uniform = summary["health_unigram_loss"], summary["health_uniform_loss"]
    findings = {
        "collapsed": collapsed(summary),
        "saturated": saturated(history),
        "stalled": stalled(losses, unigram),
        "unstable": unstable(history, uniform, summary.get("health_grad_clip")),
    }
    flags = tuple(name for name, found in findings.items() if found)
    if flags:
        return HealthVerdict(flags, "; ".join(f"{name}: {findings[name]}" for name in flags))
    final = losses[-1][1]
    rate = clip_fraction_over(history.get("clip_fraction", []))
    evidence = (
        f"ok: train loss {final:.2f} is {(unigram - final) / unigram:.0%} below unigram {unigram:.2f}, "
        f"{rate:.0%} of steps clipped"
    )
    return HealthVerdict((), evidence)


JUDGED_METRICS = (TRAIN_LOSS, "grad_norm_total", "clip_fraction", BACKBONE_SPREAD)


def validation_shares(utilisation: pd.DataFrame) -> dict[str, float]:
    """The validation routing shares of a trial's utilisation table, keyed as :func:`judge` reads them
    (they are not logged as metrics: the table is the trial's ``utilisation.csv``)."""
    rows = utilisation[utilisation["split"] == "validation"]
    return {f"util_val_l{r.layer}_e{r.expert}": float(r.share) for r in rows.itertuples()}


def history_from_mlflow(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The step metrics :func:`judge` reads, from a run's full metric history in MLflow."""
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)) for name in JUDGED_METRICS}


BUDGET_SHARES = (25, 50, 100)
"""Percent of the budget at which the report shows the train loss beside the unigram loss (a slow start reads
as a falling row, a stall as a flat one near the unigram loss)."""


def loss_at_shares(losses: Points) -> dict[str, float]:
    """``health_train_loss_<p>pct``: the logged train loss at the first logging step past ``p``% of the run."""
    last = losses[-1][0]
    return {
        f"health_train_loss_{share}pct": next(loss for step, loss in losses if step >= share / 100 * last)
        for share in BUDGET_SHARES
    }


def assess(
    client: MlflowClient,
    run_id: str,
    summary: Mapping[str, float],
    utilisation: pd.DataFrame,
    corpus: Corpus,
    grad_clip: float | None,
    top_k: int,
) -> tuple[dict[str, float], HealthVerdict]:
    """Judge a trial whose step metrics are all in MLflow (its sink flushed), against its data's references
    (:func:`reference_summary`) and its validation routing (:func:`validation_shares`, ``top_k`` slots per token):
    the summary metrics
    ``health_clip_fraction`` (whole run) and ``health_train_loss_<p>pct`` (:func:`loss_at_shares`), and the
    verdict."""
    history = history_from_mlflow(client, run_id)
    figures = {"health_clip_fraction": clip_fraction_over(history["clip_fraction"])}
    if history[TRAIN_LOSS]:
        figures |= loss_at_shares(history[TRAIN_LOSS])
    evidence = {**summary, **validation_shares(utilisation), **reference_summary(corpus, grad_clip)}
    evidence["health_top_k"] = float(top_k)
    return figures, judge(history, evidence)
