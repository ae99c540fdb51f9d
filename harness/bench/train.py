"""``harness bench train``: training throughput of each variant, and the harness's own overhead.

For each variant of a study spec it measures, in one process and after warm-up:
- the full trainer (``harness.trainer.train``) with MLflow logging to a throwaway store, the
  RSS/NVML sampler, the progress line and routing statistics;
- the same trainer with logging off (``NullSink``): the logging overhead ratio;
- a minimal hand-written loop of the same model and batch (no logging, metrics or progress);
and reports tokens/s, ms per million tokens, achieved FLOP/s from ``harness.flops`` and its
fraction of a GEMM peak (a square matmul in the trial's precision) measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from tabulate import tabulate

from harness.bench.roofline import gemm_peak_flops
from harness.config import VARIANTS, SpecError, TrialConfig, deep_merge, load_spec, resolve_trial
from harness.data import Corpus, batchify, get_batch, load_corpus
from harness.flops import train_flops_per_token
from harness.step import build_train_state, resolve_device, seed_everything, set_threads, sync, train_step
from harness.trainer import MetricSink, NullSink, steps_per_epoch, total_steps, train

EVAL_TOKENS = 4096  # the bench's final evaluation is not timed; keep it short


def minimal_loop_tokens_per_s(config: TrialConfig, corpus: Corpus, steps: int, warmup: int) -> float:
    """The trainer's own set-up and ``train_step`` in the plainest loop: no logging, metrics, routing
    statistics, progress, evaluation or checkpoints."""
    device = resolve_device(config.train.device)
    set_threads(config)
    seed_everything(config.seed)
    t = config.train
    rows = batchify(corpus.train, t.batch_size).to(device)
    per_epoch = steps_per_epoch(rows.size(1), t.seq_len)
    state, context = build_train_state(config, corpus.train_counts(), device, total_steps(config, rows.size(1)))
    state.recurrent = state.model.initial_state(t.batch_size)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start, tokens_before = time.perf_counter(), state.tokens
        x, y = get_batch(rows, (i % per_epoch) * t.seq_len, t.seq_len)
        train_step(state, context, x, y)
    sync(device)
    return (state.tokens - tokens_before) / (time.perf_counter() - start)


class _RecordingSink:
    """Forwards to an inner sink and keeps each logging window's throughput."""

    def __init__(self, inner: MetricSink) -> None:
        self.inner, self.windows = inner, []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "tokens_per_s" in metrics:
            self.windows.append((step, metrics["tokens_per_s"]))
        self.inner.log_metrics(metrics, step)

    def sync(self) -> None:
        self.inner.sync()


def trainer_tokens_per_s(
    config: TrialConfig, corpus: Corpus, steps: int, warmup: int, mlflow_uri: str | None = None
) -> float:
    """Throughput of ``train`` over the windows after warm-up (evaluation is excluded)."""
    steps = warmup * max(1, round(steps / warmup))  # whole logging windows of `warmup` steps
    budget = {
        "tokens": (warmup + steps) * config.train.batch_size * config.train.seq_len,
        "epochs": None,
        "log_every_steps": warmup,
        "eval_every_steps": warmup + steps + 1,
    }
    config = TrialConfig.model_validate(deep_merge(config.model_dump(), {"budget": budget}))
    inner: Any = NullSink()
    if mlflow_uri is not None:
        from harness.tracking import MlflowSink, TrackingStore

        store = TrackingStore(mlflow_uri)
        run = store.client.create_run(store.experiment_id("bench-train"), run_name=config.variant)
        inner = MlflowSink(store.client, run.info.run_id)
    sink = _RecordingSink(inner)
    train(config, corpus, sink, progress=True, label=f"bench {config.variant}")
    if mlflow_uri is not None:
        inner.flush()
    timed = [tps for step, tps in sink.windows if step > warmup]
    return statistics.fmean(timed) if timed else sink.windows[-1][1]


def bench_configs(spec_path: str, variants: list[str] | None, settings: list[str]) -> list[TrialConfig]:
    """One config per variant (the spec's first seed, dense added), with ``key=value`` overrides applied."""
    spec = load_spec(spec_path)
    chosen = variants or [*spec.matrix.variants, *([] if "dense" in spec.matrix.variants else ["dense"])]
    known = [*VARIANTS, *spec.variants]
    unknown = [v for v in chosen if v not in known]
    if unknown:
        raise SpecError(f"--variants: unknown variant(s) {unknown}; choose from {known}")
    assignment = {}
    for setting in settings:
        key, sep, raw = setting.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {setting!r}: expected KEY=VALUE, e.g. train.precision=bf16")
        assignment[key] = yaml.safe_load(raw)
    configs = []
    for variant in chosen:
        try:
            configs.append(resolve_trial(spec, variant, spec.matrix.all_seeds()[0], assignment))
        except ValidationError as error:
            raise SpecError(f"{spec_path} with --set {' '.join(settings)}: {error.errors()[0]['msg']}") from None
    return configs


def bench_train(configs: list[TrialConfig], steps: int, warmup: int, rounds: int = 2) -> list[dict[str, Any]]:
    first = configs[0]
    corpus = load_corpus(first.data)
    # The final full-split evaluation is not part of the measurement: keep it short.
    corpus = dataclasses.replace(corpus, validation=corpus.validation[:EVAL_TOKENS], test=corpus.test[:EVAL_TOKENS])
    unigram = corpus.train_counts().double()
    unigram /= unigram.sum()
    device = resolve_device(first.train.device)
    peaks: dict[tuple[int, str], float] = {}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        for config in configs:
            variant = config.variant
            set_threads(config)
            peak = peaks.setdefault(
                (torch.get_num_threads(), config.train.precision), gemm_peak_flops(device, config.train.precision)
            )
            # Interleaved rounds, best of each: a shared machine's noise hits all three alike.
            minimal = full = unlogged = 0.0
            for _ in range(rounds):
                minimal = max(minimal, minimal_loop_tokens_per_s(config, corpus, steps, warmup))
                full = max(full, trainer_tokens_per_s(config, corpus, steps, warmup, uri))
                unlogged = max(unlogged, trainer_tokens_per_s(config, corpus, steps, warmup, None))
            flops = train_flops_per_token(config, corpus.vocab_size, unigram) * full
            rows.append(
                {
                    "variant": variant,
                    "backbone": config.model.backbone,
                    "precision": config.train.precision,
                    "threads": torch.get_num_threads(),
                    "output": config.model.output,
                    "tokens_per_s": full,
                    "ms_per_mtok": 1e9 / full,
                    "flops_per_s": flops,
                    "gemm_peak_flops_per_s": peak,
                    "fraction_of_peak": flops / peak,
                    "minimal_loop_tokens_per_s": minimal,
                    "trainer_vs_minimal": full / minimal,
                    "unlogged_tokens_per_s": unlogged,
                    "logging_overhead_ratio": unlogged / full,
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    table = [
        {
            "variant": r["variant"],
            "tok/s": round(r["tokens_per_s"]),
            "ms/Mtok": round(r["ms_per_mtok"]),
            "GFLOP/s": r["flops_per_s"] / 1e9,
            "% peak": 100 * r["fraction_of_peak"],
            "minimal tok/s": round(r["minimal_loop_tokens_per_s"]),
            "trainer/minimal": r["trainer_vs_minimal"],
            "no-log/log": r["logging_overhead_ratio"],
        }
        for r in rows
    ]
    lines = [tabulate(table, headers="keys", floatfmt=("", "", "", ".2f", ".1f", "", ".3f", ".3f"))]
    if rows:
        lines.append(
            f"GEMM peak ({rows[0]['precision']}, 2048^2 matmul): {rows[0]['gemm_peak_flops_per_s'] / 1e9:.1f} GFLOP/s"
        )
    return "\n".join(lines)


def write_json(rows: list[dict[str, Any]], path: str) -> None:
    Path(path).write_text(json.dumps(rows, indent=2))


def cmd_bench_train(args: argparse.Namespace) -> int:
    configs = bench_configs(args.spec, args.variants, args.set)
    rows = bench_train(configs, args.steps, args.warmup, args.rounds)
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)
        print(f"wrote {args.json}")
    return 0


def register(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser(
        "train",
        help="training tokens/s of each variant vs a minimal loop, logging overhead, FLOP/s vs GEMM peak",
    )
    parser.add_argument("spec", help="study spec YAML; its first seed's config of each variant is timed")
    parser.add_argument("--variants", nargs="+", help="default: the spec's variants plus dense")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per measurement; the best is kept")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.precision=bf16",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    parser.set_defaults(func=cmd_bench_train)
