"""Watch an LSTM backbone train: cell state, saturated units, output spread and gradient norms by step.

The minimal reproduction behind docs/backbone-stall.md. It runs the trainer's own step (``harness.step``) on a
spec's variant with the spec's first seed and recipe, and at the chosen steps prints JSON lines: the mean train
loss since the previous row, the mean |c| of the LSTM's final cell states (all layers), the share of output
units with |h| > 0.95, the standard deviation of the output across the batch's tokens (mean over units), and
each component's gradient norm.

    python scripts/backbone_probe.py studies/quick.yaml plain
    python scripts/backbone_probe.py studies/quick.yaml plain --set model.output_prior=false
"""

from __future__ import annotations

import argparse
import json

import torch

from harness.bench.train import bench_configs
from harness.data import batchify, get_batch, load_corpus
from harness.step import build_train_state, resolve_device, seed_everything, set_threads, train_step
from harness.trainer import steps_per_epoch

STEPS = (0, 10, 20, 40, 60, 100, 200, 300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("variant")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="steps to report (0-based)")
    args = parser.parse_args()
    (config,) = bench_configs(args.spec, [args.variant], args.set)
    corpus = load_corpus(config.data)
    set_threads(config)
    seed_everything(config.seed)
    rows = batchify(corpus.train, config.train.batch_size)  # (B, columns)
    n_steps, per_epoch = max(args.steps) + 1, steps_per_epoch(rows.size(1), config.train.seq_len)
    state, context = build_train_state(config, corpus.train_counts(), resolve_device(config.train.device), n_steps)
    seen: dict[str, torch.Tensor] = {}
    state.model.lstm.register_forward_hook(lambda _m, _i, out: seen.update(h=out[0], c=out[1][1]))
    state.model.train()
    losses = []
    for step in range(n_steps):
        if step % per_epoch == 0:
            state.recurrent = state.model.initial_state(config.train.batch_size)
        x, y = get_batch(rows, (step % per_epoch) * config.train.seq_len, config.train.seq_len)  # (B, T)
        out, grads = train_step(state, context, x, y, measure=step in args.steps)
        losses.append(out.loss.item())
        if step in args.steps:
            h = seen["h"].detach().reshape(-1, seen["h"].size(-1))  # (B*T, C)
            row = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "mean_abs_c": seen["c"].abs().mean().item(),
                "saturated_units": (h.abs() > 0.95).float().mean().item(),
                "output_sd_across_tokens": h.std(0).mean().item(),
                **{name: norm.item() for name, norm in grads.norms.items()},
            }
            print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            losses = []


if __name__ == "__main__":
    main()
