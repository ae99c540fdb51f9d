"""The roofline's measured ceilings (GEMM peak, memory bandwidth) and an MoE layer's cost against them.

``harness bench moe`` and ``harness bench train`` measure the ceilings in the same run as what they compare with
them, so the machine's state is the same for both.
"""

from __future__ import annotations

import statistics
import time

import torch

from harness.step import sync

COPY_BYTES = 256 * 1024**2  # large enough to leave every cache


def gemm_peak_flops(device: torch.device, precision: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square matmul in ``precision``, median of ``repeats`` after two warm-up rounds."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)


def memory_bandwidth(device: torch.device, precision: str, repeats: int = 5) -> float:
    """Bytes/s of a ``COPY_BYTES`` tensor copy (read + write), median of ``repeats``."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    src = torch.ones(COPY_BYTES // dtype.itemsize, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return 2.0 * COPY_BYTES / statistics.median(times)


def layer_cost(
    *, tokens: int, experts: int, top_k: int, expert_type: str, d: int, h: int, rank: int, itemsize: int
) -> tuple[float, float]:
    """``(FLOPs, bytes)`` of one MoE layer's forward + backward (input and every trainable weight).

    FLOPs: 2 per multiply-add; a trainable matmul costs 3x its forward (forward, input gradient,
    weight gradient), the frozen LoRA base 2x; the router is included. Bytes: every expert weight
    read in forward and in backward and its gradient written (3x; the frozen base: 2 reads), plus
    each routed row's activations (input d, pre-activation h or rank, output d) written and read
    once in forward and again as gradients in backward (4x).
    """
    rows = tokens * top_k
    router_flops = 3 * 2.0 * tokens * d * experts
    if expert_type == "lora":
        flops = router_flops + 2 * (2.0 * tokens * d * h * 2) + 3 * (2.0 * rows * d * rank * 2)
        weights = 2 * (2 * d * h + h + d) + 3 * experts * (2 * d * rank)
        activations = 4 * (rows * (2 * d + rank) + tokens * (2 * d + h))
    else:
        flops = router_flops + 3 * (2.0 * rows * d * h * 2)
        weights = 3 * experts * (2 * d * h + h + d)
        activations = 4 * rows * (2 * d + h)
    return flops, float(itemsize * (weights + activations + 3 * experts * d))  # + the router's weights
