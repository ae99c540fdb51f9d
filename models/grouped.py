"""Grouped per-expert matmuls: two kernels behind one registry (``FFN_KERNELS``, ``LOW_RANK_KERNELS``).

Tokens arrive grouped by expert (``counts[e]`` consecutive rows for expert ``e``; rows after the
last group are not computed and hold anything).

``grouped_mm``: torch's native grouped GEMM (``torch.nn.functional.grouped_mm``, autograd
included; what torchtitan and Hugging Face use on GPU). Group boundaries stay a device tensor of
offsets, so nothing is read back to the host. It has no bias argument (biases are gathered per row)
and needs 16-byte-aligned rows (narrow widths are zero-padded).

``loop``: a Python loop over the non-empty groups with hand-written backward passes (the group
sizes are read to the host once per call). Autograd over
a Python loop of per-expert ``addmm`` records several nodes per expert and keeps every
intermediate alive; these functions run the same loop in forward and backward themselves, write
into preallocated buffers, apply the activation once over all rows, and save only the inputs and
the pre-activation. Cost therefore follows the active (non-empty) experts and the routed rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ExpertGroups:
    """Where each expert's rows are: ``counts[e]`` rows ending at ``offsets[e]``; ``row_expert`` per row."""

    counts: Tensor  # [E] int64
    offsets: Tensor  # [E] int32 cumulative counts (grouped_mm's ``offs``)
    row_expert: Tensor  # [rows] int64 expert of every row; rows past the last group (dropped): E


def activate(h: Tensor, activation: str) -> Tensor:
    """ReLU, GELU (erf), or SwiGLU on ``h = [gate | up]`` (which halves the width)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h) if activation == "gelu" else F.relu(h)


def activation_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """Gradient of :func:`activate` w.r.t. its input ``h``."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.cat((torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)), dim=-1)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    return torch.ops.aten.threshold_backward(grad, h, 0)  # one fused kernel, no mask tensor


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of every non-empty group."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def _weight_grad_buffer(weight: Tensor, counts: list[int]) -> Tensor:
    """Uninitialised per-expert gradient with only the idle experts' slices zeroed: the active
    slices are overwritten by their matmul, so a full ``zeros_like`` would write them twice."""
    grad = torch.empty_like(weight)
    for e, n in enumerate(counts):
        if not n:
            grad[e].zero_()
    return grad


def _group_sums(rows: Tensor, counts: list[int]) -> Tensor:
    """``[E, width]`` column sums of each group (the bias gradients).

    On CPU one ``index_add_`` (deterministic there, and far faster than ``segment_reduce``); on
    CUDA, where ``index_add_`` uses atomics and is not deterministic, one sum per group."""
    sums = rows.new_zeros(len(counts), rows.size(-1))
    if rows.device.type == "cpu":
        owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        return sums.index_add_(0, owner, rows[: owner.numel()])
    for e, s, t in _segments(counts):
        torch.sum(rows[s:t], 0, out=sums[e])
    return sums


class GroupedFFN(torch.autograd.Function):
    """``y_rows(e) = act(x_rows(e) @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]`` for every group."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor, counts: list[int], act: str
    ) -> Tensor:
        segments = _segments(counts)
        pre = x.new_empty(x.size(0), w_in.size(-1))
        for e, s, t in segments:
            torch.addmm(b_in[e], x[s:t], w_in[e], out=pre[s:t])
        hidden = activate(pre, act)
        y = x.new_empty(x.size(0), w_out.size(-1))
        for e, s, t in segments:
            torch.addmm(b_out[e], hidden[s:t], w_out[e], out=y[s:t])
        ctx.save_for_backward(x, w_in, w_out, pre)
        ctx.counts, ctx.segments, ctx.act = counts, segments, act
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, w_in, w_out, pre = ctx.saved_tensors
        counts, segments, act = ctx.counts, ctx.segments, ctx.act
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        grad_y = grad_y.contiguous()
        hidden = activate(pre, act) if need_w_out else None  # recomputed: cheaper than keeping it
        grad_hidden = grad_y.new_empty(grad_y.size(0), w_out.size(1))
        grad_w_out = _weight_grad_buffer(w_out, counts) if need_w_out else None
        for e, s, t in segments:
            torch.mm(grad_y[s:t], w_out[e].t(), out=grad_hidden[s:t])
            if grad_w_out is not None:
                torch.mm(hidden[s:t].t(), grad_y[s:t], out=grad_w_out[e])
        grad_pre = activation_backward(grad_hidden, pre, act)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w_in = _weight_grad_buffer(w_in, counts) if need_w_in else None
        for e, s, t in segments:
            if grad_x is not None:
                torch.mm(grad_pre[s:t], w_in[e].t(), out=grad_x[s:t])
            if grad_w_in is not None:
                torch.mm(x[s:t].t(), grad_pre[s:t], out=grad_w_in[e])
        grad_b_in = _group_sums(grad_pre, counts) if need_b_in else None
        grad_b_out = _group_sums(grad_y, counts) if need_b_out else None
        return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None


class GroupedLowRank(torch.autograd.Function):
    """``y_rows(e) = (x_rows(e) @ a[e]) @ b[e]`` for every group (the LoRA delta, unscaled)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, b: Tensor, counts: list[int]) -> Tensor:
        segments = _segments(counts)
        low = x.new_empty(x.size(0), a.size(-1))
        y = x.new_empty(x.size(0), b.size(-1))
        for e, s, t in segments:
            torch.mm(x[s:t], a[e], out=low[s:t])
            torch.mm(low[s:t], b[e], out=y[s:t])
        ctx.save_for_backward(x, a, b, low)
        ctx.counts, ctx.segments = counts, segments
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, a, b, low = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous()
        grad_low = grad_y.new_empty(grad_y.size(0), a.size(-1))
        grad_x = torch.empty_like(x) if need_x else None
        grad_a = _weight_grad_buffer(a, ctx.counts) if need_a else None
        grad_b = _weight_grad_buffer(b, ctx.counts) if need_b else None
        for e, s, t in ctx.segments:
            g = grad_y[s:t]
            torch.mm(g, b[e].t(), out=grad_low[s:t])
            if grad_b is not None:
                torch.mm(low[s:t].t(), g, out=grad_b[e])
            if grad_a is not None:
                torch.mm(x[s:t].t(), grad_low[s:t], out=grad_a[e])
            if grad_x is not None:
                torch.mm(grad_low[s:t], a[e].t(), out=grad_x[s:t])
        return grad_x, grad_a, grad_b, None


def _aligned_grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """``grouped_mm`` with inner and output widths zero-padded to its 16-byte row alignment."""
    align = 16 // x.element_size()
    pad_in, pad_out = -x.size(-1) % align, -w.size(-1) % align
    if pad_in or pad_out:
        x, w = F.pad(x, (0, pad_in)), F.pad(w, (0, pad_out, 0, pad_in))
    y = F.grouped_mm(x, w, offs=offsets)
    return y[:, : y.size(-1) - pad_out] if pad_out else y


def ffn_grouped_mm(
    x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor, groups: ExpertGroups, act: str
) -> Tensor:
    # Biases get a zero row E for rows past the last group, whose (uncomputed) gradients land there.
    pre = _aligned_grouped_mm(x, w_in, groups.offsets) + F.pad(b_in, (0, 0, 0, 1))[groups.row_expert]  # (S, h)
    y = _aligned_grouped_mm(activate(pre, act), w_out, groups.offsets)  # (S, d)
    return y + F.pad(b_out, (0, 0, 0, 1))[groups.row_expert]


@torch.compiler.disable  # host-side group sizes: run eagerly under torch.compile (dynamo cannot trace them)
def ffn_loop(
    x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor, groups: ExpertGroups, act: str
) -> Tensor:
    return GroupedFFN.apply(x, w_in, b_in, w_out, b_out, groups.counts.tolist(), act)


def low_rank_grouped_mm(x: Tensor, a: Tensor, b: Tensor, groups: ExpertGroups) -> Tensor:
    return _aligned_grouped_mm(_aligned_grouped_mm(x, a, groups.offsets), b, groups.offsets)  # (S, r) -> (S, d)


@torch.compiler.disable  # as ffn_loop
def low_rank_loop(x: Tensor, a: Tensor, b: Tensor, groups: ExpertGroups) -> Tensor:
    return GroupedLowRank.apply(x, a, b, groups.counts.tolist())


FFN_KERNELS: dict[str, Callable[..., Tensor]] = {"loop": ffn_loop, "grouped_mm": ffn_grouped_mm}
LOW_RANK_KERNELS: dict[str, Callable[..., Tensor]] = {"loop": low_rank_loop, "grouped_mm": low_rank_grouped_mm}
