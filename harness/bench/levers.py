"""``harness bench levers``: what each speed lever buys, and whether the fast path keeps perplexity.

Starting from the *plain* path (fp32, full tied softmax, eager, unfused AdamW) of one variant,
it times the training step with each lever switched on alone, then trains the plain config and
the spec's own config (its levers combined) for the spec's token budget and compares their
speed and validation perplexity on the same validation tokens.

Levers and their config keys: ``model.output=adaptive`` (adaptive softmax, Grave et al. 2017),
``train.precision=bf16`` (autocast), ``train.compile=true`` (``torch.compile``),
``train.threads``, ``optim.fused`` (one fused AdamW kernel). Batches need no lever: a split is
batchified onto the device once and each step's batch is a view of it, so nothing is prepared on
the critical path. For ``torch.compile`` it also prints how many graphs were compiled meanwhile
(recompiling every step shows as about one per step).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from harness.bench.train import trainer_tokens_per_s
from harness.config import SpecError, TrialConfig, load_spec, resolve_trial, set_dotted
from harness.data import Corpus, load_corpus
from harness.trainer import NullSink, train

PLAIN = {
    "train.precision": "fp32",
    "model.output": "full",
    "model.tie_weights": True,
    "train.compile": False,
    "optim.fused": False,
}
LEVERS: dict[str, dict[str, Any]] = {
    "adaptive softmax": {"model.output": "adaptive", "model.tie_weights": False},
    "fused AdamW": {"optim.fused": True},
    "bf16 autocast": {"train.precision": "bf16"},
    "torch.compile": {"train.compile": True},
    "threads=1": {"train.threads": 1},
}


def with_settings(config: TrialConfig, settings: dict[str, Any]) -> TrialConfig:
    tree = config.model_dump()
    for key, value in settings.items():
        tree = set_dotted(tree, key, value)
    return TrialConfig.model_validate(tree)


def compiled_graphs(run: Callable[[], float]) -> tuple[float, int]:
    """``run()``'s result and how many graphs torch.compile built meanwhile: about one per step means it
    recompiles every step (a shape or Python value changing per step), a handful means it compiled once."""
    import torch
    from torch._dynamo.utils import counters  # torch's only count of compiled graphs

    torch.compiler.reset()
    counters.clear()
    result = run()
    return result, int(counters["stats"]["unique_graphs"])


def lever_speeds(plain: TrialConfig, corpus: Corpus, levers: list[str], steps: int, warmup: int) -> list[dict]:
    rows = [{"lever": "plain (fp32, full softmax)", "tokens_per_s": trainer_tokens_per_s(plain, corpus, steps, warmup)}]
    for name in levers:
        config = with_settings(plain, LEVERS[name])
        row: dict[str, Any] = {"lever": name}
        row["tokens_per_s"], graphs = compiled_graphs(lambda c=config: trainer_tokens_per_s(c, corpus, steps, warmup))
        if config.train.compile:
            row["graphs_compiled"] = graphs
        rows.append(row)
    for row in rows:
        row["speedup_vs_plain"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def end_to_end(plain: TrialConfig, fast: TrialConfig, corpus: Corpus) -> list[dict[str, Any]]:
    """Both configs for the full token budget; val PPL on the same (truncated) validation split."""
    rows = []
    for label, config in (("plain", plain), ("spec", fast)):
        summary = train(config, corpus, NullSink(), progress=True, label=f"levers {label}").summary
        rows.append(
            {
                "path": label,
                "precision": config.train.precision,
                "output": config.model.output,
                "compile": config.train.compile,
                "tokens": summary["train_tokens"],
                "tokens_per_s": summary["train_tokens_per_s"],
                "val_ppl": summary["final_val_ppl"],
            }
        )
    rows[1]["speedup_vs_plain"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    rows[1]["val_ppl_vs_plain"] = rows[1]["val_ppl"] / rows[0]["val_ppl"]
    return rows


def cmd_bench_levers(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.variant not in spec.matrix.variants and args.variant != "dense":
        raise SpecError(f"--variant {args.variant!r} is not in {args.spec}'s matrix {spec.matrix.variants}")
    fast = resolve_trial(spec, args.variant, spec.matrix.all_seeds()[0])
    plain = with_settings(fast, PLAIN)
    corpus = load_corpus(fast.data)
    corpus = dataclasses.replace(
        corpus, validation=corpus.validation[: args.eval_tokens], test=corpus.test[: args.eval_tokens]
    )
    unknown = [name for name in args.levers if name not in LEVERS]
    if unknown:
        raise SpecError(f"--levers: unknown lever(s) {unknown}; choose from {list(LEVERS)}")
    print(f"{args.variant}: each lever alone on the plain path ({args.steps} timed steps after {args.warmup})")
    for row in lever_speeds(plain, corpus, args.levers, args.steps, args.warmup):
        graphs = f"  ({row['graphs_compiled']} graphs compiled)" if "graphs_compiled" in row else ""
        print(f"  {row['lever']:28s} {row['tokens_per_s']:9.0f} tok/s  x{row['speedup_vs_plain']:.2f}{graphs}")
    if args.skip_end_to_end:
        return 0
    budget = f"{fast.budget.tokens:,} tokens" if fast.budget.tokens else f"{fast.budget.epochs:g} epochs"
    print(f"{args.variant}: plain vs the spec's config, {budget} each")
    for row in end_to_end(plain, fast, corpus):
        extra = (
            f"  speed x{row['speedup_vs_plain']:.2f}, val PPL ratio {row['val_ppl_vs_plain']:.3f}"
            if "speedup_vs_plain" in row
            else ""
        )
        print(
            f"  {row['path']:6s} {row['precision']} {row['output']:8s} compile={row['compile']!s:5s} "
            f"{row['tokens_per_s']:8.0f} tok/s  val PPL {row['val_ppl']:.1f}{extra}"
        )
    return 0


def register(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser("levers", help="speed of each lever alone, and plain vs the spec's path end to end")
    parser.add_argument("spec", help="study spec YAML whose config is the fast path")
    parser.add_argument("--variant", default="hybrid")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), help=f"subset of {list(LEVERS)}")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=40_000, help="validation tokens both paths are scored on")
    parser.add_argument("--skip-end-to-end", action="store_true", help="only the per-lever timings")
    parser.set_defaults(func=cmd_bench_levers)
