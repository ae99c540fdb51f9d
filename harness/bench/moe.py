"""``harness bench moe``: forward+backward time of one MoE layer against the hardware's limit and its baselines.

For every E (experts), k (top-k) and expert type it times, interleaved in one process so that load
drift on a shared machine hits all cases alike:
- ``moe``: the real :class:`models.MoELayer` (router, sparse dispatch, grouped experts, combine, losses),
  once per expert kernel (``loop``, ``grouped_mm``; one row each);
- ``dense``: one FFN with the same active parameters (width k*d_hidden for MLP experts; the LoRA
  base width plus k*rank for LoRA experts, a rank-r adapter costing what r hidden units cost);
- ``naive``: the same router and experts, but every expert computed for every token;
- ``base`` (LoRA only): a dense FFN of the base's width, the reference of the hybrid target.
Each figure is the median milliseconds of forward+backward (gradients for the input and every
parameter) after one warm-up round (naive: at most ``NAIVE_REPEATS`` timed rounds).

Roofline: the same run measures the GEMM peak (``harness.bench.roofline.gemm_peak_flops``) and the
memory bandwidth (a tensor copy, read + write) for the precision and thread count in use. Each row
carries its FLOPs and bytes moved (:func:`layer_cost`), the lower bound
``max(FLOPs / peak, bytes / bandwidth)`` and time / bound.

Glibc serves blocks of 32 MiB and more (E=64's weight gradients) with mmap and returns them on
free, so every step page-faults them back in; the command re-executes
itself with ``MALLOC_MMAP_MAX_=0`` (never mmap) and a high ``MALLOC_TRIM_THRESHOLD_`` so freed
memory stays in the heap for reuse. Set either variable yourself to opt out. Training runs
(``run-study``) do not get these settings.
"""
# Over 350 lines: one benchmark: its method (docstring), cases, timing and table.

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from harness.bench.roofline import gemm_peak_flops, layer_cost, memory_bandwidth
from harness.config import MoEConfig
from harness.step import sync

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
TARGETS = {"moe_over_dense": 1.5, "e64_over_e4": 1.5, "hybrid_over_base": 1.3, "time_over_bound": 1.5}
KERNELS = ("loop", "grouped_mm")


def register(bench_subparsers: Any) -> None:
    """Add ``moe`` to the ``harness bench`` subcommand group."""
    p = bench_subparsers.add_parser("moe", help="time the MoE layer (fwd+bwd) against dense and naive baselines")
    p.add_argument("--quick", action="store_true", help="E in {4, 8}, 1024 tokens, few repeats (for tests)")
    p.add_argument("--experts", type=int, nargs="+", help=f"expert counts (default {' '.join(map(str, FULL_EXPERTS))})")
    p.add_argument("--tokens", type=int, help="tokens per batch (default 4096; 1024 with --quick)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-hidden", type=int, default=512, help="hidden width of one MLP expert and of the LoRA base")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--repeats", type=int, help="timed repeats per measurement (default 5; 2 with --quick)")
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
        repeats=args.repeats or (2 if args.quick else 5),
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


def _layer_config(experts: int, top_k: int, expert_type: str, d_hidden: int, lora_rank: int, kernel: str) -> MoEConfig:
    # Switch routing for k=1, Mixtral softmax top-k otherwise: the routers the variants use.
    router = "switch" if top_k == 1 else "softmax_topk"
    return MoEConfig(
        n_experts=experts,
        top_k=top_k,
        router=router,
        expert=expert_type,
        d_hidden=d_hidden,
        lora_rank=lora_rank,
        kernel=kernel,
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
                sync(x.device)
                start = time.perf_counter()
                _step(module, forward, x, grad)
                sync(x.device)
            if round_:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass(frozen=True, kw_only=True)
class BenchPoint:
    """One point of the sweep: the layer's shape and the precision it runs in."""

    expert_type: str
    top_k: int
    experts: int
    tokens: int
    d_model: int
    d_hidden: int
    lora_rank: int
    precision: str

    @property
    def active_width(self) -> int:
        """Hidden width of the dense FFN with the same active parameters per token."""
        if self.expert_type == "lora":
            return self.d_hidden + self.top_k * self.lora_rank
        return self.top_k * self.d_hidden


def _cases(point: BenchPoint, device: torch.device) -> dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]]:
    """The MoE layer once per kernel (same weights), the dense FFN of equal active size, the naive layer."""
    from models.experts import FeedForward
    from models.moe import MoELayer

    p = point
    layers = {
        k: MoELayer(p.d_model, _layer_config(p.experts, p.top_k, p.expert_type, p.d_hidden, p.lora_rank, k)).to(device)
        for k in KERNELS
    }
    for layer in layers.values():  # the same weights for every kernel
        layer.load_state_dict(layers[KERNELS[0]].state_dict())
    dense = FeedForward(p.d_model, p.active_width, "relu").to(device)
    cases: dict[str, tuple[nn.Module, Callable[[Tensor], Tensor]]] = {
        **{k: (layer, lambda t, m=layer: m(t)[0]) for k, layer in layers.items()},
        "dense": (dense, dense),
        "naive": (layers["loop"], lambda t, m=layers["loop"]: naive_forward(m, t)),
    }
    if p.expert_type == "lora":
        base = FeedForward(p.d_model, p.d_hidden, "relu").to(device)
        cases["base"] = (base, base)
    return cases


def _bench_point(
    point: BenchPoint, x: Tensor, grad: Tensor, repeats: int, device: torch.device, peak: float, bandwidth: float
) -> list[dict[str, Any]]:
    """Time one point's cases interleaved; one row per kernel with its roofline bound."""
    p = point
    ms = _time_interleaved(_cases(p, device), x, grad, repeats, p.precision)
    summary = " ".join(f"{name}={value:.1f}ms" for name, value in ms.items())
    print(f"  {p.expert_type} E={p.experts} k={p.top_k}: {summary}", file=sys.stderr, flush=True)  # progress
    itemsize = 2 if p.precision == "bf16" else 4
    flops, moved = layer_cost(
        tokens=p.tokens,
        experts=p.experts,
        top_k=p.top_k,
        expert_type=p.expert_type,
        d=p.d_model,
        h=p.d_hidden,
        rank=p.lora_rank,
        itemsize=itemsize,
    )
    bound_ms = 1e3 * max(flops / peak, moved / bandwidth)
    shared = {
        "experts": p.experts,
        "top_k": p.top_k,
        "expert_type": p.expert_type,
        "tokens": p.tokens,
        "dense_ms": ms["dense"],
        "naive_ms": ms["naive"],
        "base_ms": ms.get("base"),
        "flops": flops,
        "bytes": moved,
        "bound_ms": bound_ms,
        "gemm_peak_flops_per_s": peak,
        "bandwidth_bytes_per_s": bandwidth,
        "dense_hidden": p.active_width,
        "d_model": p.d_model,
        "d_hidden": p.d_hidden,
        "lora_rank": p.lora_rank if p.expert_type == "lora" else None,
        "precision": p.precision,
        "device": str(device),
    }
    return [
        {**shared, "kernel": kernel, "moe_ms": ms[kernel], "time_over_bound": ms[kernel] / bound_ms}
        for kernel in KERNELS
    ]


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
    """One row per (expert type, k, E, kernel); the roofline's peak and bandwidth are measured first."""
    import torch

    peak, bandwidth = gemm_peak_flops(device, precision), memory_bandwidth(device, precision)
    print(f"  GEMM peak {peak / 1e9:.1f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)
    rows = []
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model, device=device, requires_grad=True)
    grad = torch.randn(tokens, d_model, device=device)
    for expert_type in EXPERT_TYPES:
        for top_k in TOP_KS:
            for n in experts:
                point = BenchPoint(
                    expert_type=expert_type,
                    top_k=top_k,
                    experts=n,
                    tokens=tokens,
                    d_model=d_model,
                    d_hidden=d_hidden,
                    lora_rank=lora_rank,
                    precision=precision,
                )
                rows += _bench_point(point, x, grad, repeats, device, peak, bandwidth)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Per-row time, roofline bound and ratios, then E_max/E_min at fixed k, type and kernel, then each target."""
    table = [
        {
            "type": r["expert_type"],
            "E": r["experts"],
            "k": r["top_k"],
            "kernel": r["kernel"],
            "GFLOP": r["flops"] / 1e9,
            "MB": r["bytes"] / 1e6,
            "bound ms": r["bound_ms"],
            "moe ms": r["moe_ms"],
            "t/bound": r["time_over_bound"],
            "dense ms": r["dense_ms"],
            "naive ms": r["naive_ms"],
            "moe/dense": r["moe_ms"] / r["dense_ms"],
            "naive/moe": r["naive_ms"] / r["moe_ms"],
            "moe/base": r["moe_ms"] / r["base_ms"] if r["base_ms"] else None,
        }
        for r in rows
    ]
    lines = [
        f"GEMM peak {rows[0]['gemm_peak_flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"bandwidth {rows[0]['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (measured in this run)",
        tabulate(table, headers="keys", floatfmt=".2f", missingval="-"),
    ]
    for kernel in KERNELS:
        mine = [r for r in rows if r["kernel"] == kernel]
        worst = max(mine, key=lambda r: r["time_over_bound"])
        met = sum(r["time_over_bound"] <= TARGETS["time_over_bound"] for r in mine)
        lines.append(
            f"{kernel}: time/bound <= {TARGETS['time_over_bound']} in {met}/{len(mine)} rows; worst "
            f"{worst['time_over_bound']:.2f} ({worst['expert_type']} E={worst['experts']} k={worst['top_k']}); "
            f"max moe/dense = {max(r['moe_ms'] / r['dense_ms'] for r in mine):.2f} "
            f"(target <= {TARGETS['moe_over_dense']})"
        )
        for expert_type in EXPERT_TYPES:
            for top_k in TOP_KS:
                group = sorted(
                    (r for r in mine if r["expert_type"] == expert_type and r["top_k"] == top_k), key=_experts
                )
                if len(group) > 1:
                    lo, hi = group[0], group[-1]
                    lines.append(
                        f"  {expert_type} k={top_k}: time(E={hi['experts']})/time(E={lo['experts']}) = "
                        f"{hi['moe_ms'] / lo['moe_ms']:.2f} (target <= {TARGETS['e64_over_e4']})"
                    )
        hybrid = [r["moe_ms"] / r["base_ms"] for r in mine if r["expert_type"] == "lora" and r["top_k"] == 1]
        if hybrid:
            lines.append(
                f"  hybrid (top-1 LoRA) / dense FFN of base width: max {max(hybrid):.2f} "
                f"(target <= {TARGETS['hybrid_over_base']})"
            )
    return "\n".join(lines)


def _experts(row: dict[str, Any]) -> int:
    return row["experts"]
