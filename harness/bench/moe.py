"""``harness bench moe``: forward+backward time of one MoE layer against its dense and naive baselines.

For every E (experts), k (top-k) and expert type it times, interleaved in one process so that load
drift on a shared machine hits all three alike:
- ``moe``: the real :class:`models.MoELayer` (router, sparse dispatch, grouped experts, combine, losses);
- ``dense``: one FFN with the same active parameters (width k*d_hidden for MLP experts; the LoRA
  base width plus k*rank for LoRA experts, a rank-r adapter costing what r hidden units cost);
- ``naive``: the same router and experts, but every expert computed for every token;
- ``base`` (LoRA only): a dense FFN of the base's width, the reference of the hybrid target.
Each figure is the median milliseconds of forward+backward (gradients for the input and every
parameter) after one warm-up round (naive: at most ``NAIVE_REPEATS`` timed rounds).

Glibc serves blocks of 32 MiB and more (E=64's weight gradients) with mmap and returns them on
free, so every step page-faults them back in; the command re-executes
itself with ``MALLOC_MMAP_MAX_=0`` (never mmap) and a high ``MALLOC_TRIM_THRESHOLD_`` so freed
memory stays in the heap for reuse. Set either variable yourself to opt out. Training runs
(``run-study``) do not get these settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import MoEConfig

if TYPE_CHECKING:  # torch is imported where it is used, so that building the CLI parser stays fast
    import torch
    from torch import Tensor, nn

    from models.moe import MoELayer

FULL_EXPERTS = (4, 8, 16, 32, 64)
QUICK_EXPERTS = (4, 8)
TOP_KS = (1, 2)
EXPERT_TYPES = ("mlp", "lora")
# Keep freed blocks in the heap instead of mmap/munmap + page faults every step (glibc only).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(4 * 1024**3)}
NAIVE_REPEATS = 3  # compute-every-expert at E=64 costs seconds per step; its median needs fewer rounds
TARGETS = {"moe_over_dense": 1.5, "e64_over_e4": 1.5, "hybrid_over_base": 1.3}


def register(bench_subparsers: Any) -> None:
    """Add ``moe`` to the ``harness bench`` subcommand group."""
    p = bench_subparsers.add_parser("moe", help="time the MoE layer (fwd+bwd) against dense and naive baselines")
    p.add_argument("--quick", action="store_true", help="E in {4, 8}, 1024 tokens, few repeats (for tests)")
    p.add_argument("--experts", type=int, nargs="+", help=f"expert counts (default {' '.join(map(str, FULL_EXPERTS))})")
    p.add_argument("--tokens", type=int, help="tokens per batch (default 4096; 1024 with --quick)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-hidden", type=int, default=512, help="hidden width of one MLP expert and of the LoRA base")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--repeats", type=int, help="timed repeats per measurement (default 7; 2 with --quick)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", dest="json_path", help="also write the rows as a JSON list to this path")
    p.set_defaults(func=cmd_bench_moe)


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["bench", "moe", "--d-model", str(args.d_model), "--d-hidden", str(args.d_hidden)]
    argv += ["--lora-rank", str(args.lora_rank), "--precision", args.precision, "--device", args.device]
    if args.quick:
        argv.append("--quick")
    if args.experts:
        argv += ["--experts", *map(str, args.experts)]
    options = {"--tokens": args.tokens, "--repeats": args.repeats, "--threads": args.threads, "--json": args.json_path}
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    return argv


def cmd_bench_moe(args: argparse.Namespace) -> int:
    import torch

    if sys.platform.startswith("linux") and not any(name in os.environ for name in MALLOC_ENV):
        # Allocator settings only take effect at process start: rerun ourselves with them.
        root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            **MALLOC_ENV,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        return subprocess.call([sys.executable, "-m", "harness", *_child_argv(args)], env=env)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_bench(
        experts=args.experts or (QUICK_EXPERTS if args.quick else FULL_EXPERTS),
        tokens=args.tokens or (1024 if args.quick else 4096),
        d_model=args.d_model,
        d_hidden=args.d_hidden,
        lora_rank=args.lora_rank,
        repeats=args.repeats or (2 if args.quick else 7),
        precision=args.precision,
        device=device,
    )
    allocator = ", ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "default allocator"
    print(f"device={device} precision={args.precision} threads={torch.get_num_threads()} {allocator}")
    print(format_table(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {len(rows)} rows to {args.json_path}")
    return 0


def _layer_config(experts: int, top_k: int, expert_type: str, d_hidden: int, lora_rank: int) -> MoEConfig:
    # Switch routing for k=1, Mixtral softmax top-k otherwise: the routers the variants use.
    router = "switch" if top_k == 1 else "softmax_topk"
    return MoEConfig(
        n_experts=experts, top_k=top_k, router=router, expert=expert_type, d_hidden=d_hidden, lora_rank=lora_rank
    )


def naive_forward(layer: MoELayer, x: Tensor) -> Tensor:
    """Every expert on every token, weighted by the (mostly zero) dense gates."""
    routing = layer.router(x)
    every = layer.experts.forward_every_expert(x)
    return (routing.dense_gates().unsqueeze(-1).to(every.dtype) * every).sum(1)


def _step(module: nn.Module, forward: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor) -> None:
    for p in module.parameters():
        p.grad = None
    x.grad = None
    forward(x).backward(grad)


def _time_interleaved(
    cases: dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]],
    x: Tensor,
    grad: Tensor,
    repeats: int,
    precision: str,
) -> dict[str, float]:
    """Median ms of fwd+bwd per case; one round times every case once, so drift is shared."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in cases}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, thread pool, caches)
        for name, (module, forward) in cases.items():
            if name == "naive" and round_ > NAIVE_REPEATS:
                continue
            with torch.autocast(x.device.type, dtype=dtype, enabled=precision == "bf16"):
                _sync(x.device)
                start = time.perf_counter()
                _step(module, forward, x, grad)
                _sync(x.device)
            if round_:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    *,
    experts: tuple[int, ...] | list[int],
    tokens: int,
    d_model: int,
    d_hidden: int,
    lora_rank: int,
    repeats: int,
    precision: str,
    device: torch.device,
) -> list[dict[str, Any]]:
    import torch

    from models.experts import FeedForward
    from models.moe import MoELayer

    rows = []
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model, device=device, requires_grad=True)
    grad = torch.randn(tokens, d_model, device=device)
    for expert_type in EXPERT_TYPES:
        for top_k in TOP_KS:
            for n in experts:
                layer = MoELayer(d_model, _layer_config(n, top_k, expert_type, d_hidden, lora_rank)).to(device).train()
                active_width = d_hidden + top_k * lora_rank if expert_type == "lora" else top_k * d_hidden
                dense = FeedForward(d_model, active_width, "relu").to(device)
                cases: dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]] = {
                    "moe": (layer, lambda t, m=layer: m(t)[0]),
                    "dense": (dense, dense),
                    "naive": (layer, lambda t, m=layer: naive_forward(m, t)),
                }
                if expert_type == "lora":
                    base = FeedForward(d_model, d_hidden, "relu").to(device)
                    cases["base"] = (base, base)
                ms = _time_interleaved(cases, x, grad, repeats, precision)
                summary = " ".join(f"{name}={value:.1f}ms" for name, value in ms.items())
                print(f"  {expert_type} E={n} k={top_k}: {summary}", file=sys.stderr, flush=True)  # progress
                rows.append(
                    {
                        "experts": n,
                        "top_k": top_k,
                        "expert_type": expert_type,
                        "tokens": tokens,
                        "moe_ms": ms["moe"],
                        "dense_ms": ms["dense"],
                        "naive_ms": ms["naive"],
                        "base_ms": ms.get("base"),
                        "dense_hidden": active_width,
                        "d_model": d_model,
                        "d_hidden": d_hidden,
                        "lora_rank": lora_rank if expert_type == "lora" else None,
                        "precision": precision,
                        "device": str(device),
                    }
                )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Per-row ratios, then E_max/E_min at fixed k and type, then each target's verdict."""
    lines = [
        f"{'type':5s} {'E':>3s} {'k':>2s} {'tokens':>6s} {'moe ms':>8s} {'dense ms':>8s} {'naive ms':>9s} "
        f"{'moe/dense':>9s} {'naive/moe':>9s} {'moe/base':>8s}"
    ]
    for r in rows:
        base = f"{r['moe_ms'] / r['base_ms']:8.2f}" if r["base_ms"] else f"{'-':>8s}"
        lines.append(
            f"{r['expert_type']:5s} {r['experts']:3d} {r['top_k']:2d} {r['tokens']:6d} {r['moe_ms']:8.1f} "
            f"{r['dense_ms']:8.1f} {r['naive_ms']:9.1f} {r['moe_ms'] / r['dense_ms']:9.2f} "
            f"{r['naive_ms'] / r['moe_ms']:9.2f} {base}"
        )
    worst_dense = max(r["moe_ms"] / r["dense_ms"] for r in rows)
    lines.append(f"max moe/dense = {worst_dense:.2f} (target <= {TARGETS['moe_over_dense']})")
    for expert_type in EXPERT_TYPES:
        for top_k in TOP_KS:
            group = sorted((r for r in rows if r["expert_type"] == expert_type and r["top_k"] == top_k), key=_experts)
            if len(group) > 1:
                lo, hi = group[0], group[-1]
                lines.append(
                    f"{expert_type} k={top_k}: time(E={hi['experts']})/time(E={lo['experts']}) = "
                    f"{hi['moe_ms'] / lo['moe_ms']:.2f} (target <= {TARGETS['e64_over_e4']})"
                )
    hybrid = [r["moe_ms"] / r["base_ms"] for r in rows if r["expert_type"] == "lora" and r["top_k"] == 1]
    if hybrid:
        lines.append(
            f"hybrid (top-1 LoRA) / dense FFN of base width: max {max(hybrid):.2f} "
            f"(target <= {TARGETS['hybrid_over_base']})"
        )
    return "\n".join(lines)


def _experts(row: dict[str, Any]) -> int:
    return row["experts"]
