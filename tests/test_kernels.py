"""The expert kernels: ``loop`` and ``grouped_mm`` agree, and the grouped_mm path never reads the device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from harness.config import TrialConfig
from harness.metrics import RoutingTally
from models import build_model
from models.experts import AUTO_CPU_KERNEL, resolve_kernel
from models.moe import MoELayer
from tests.test_moe_layer import ROUTER_K, make_layer, randomise_

# E=8 experts and 3 tokens x k <= 2 leave at least two experts empty; groups come out uneven.
N_EXPERTS, N_TOKENS = 8, 3
CASES = [(r, e) for r in ROUTER_K for e in ("mlp", "lora")]


def kernel_pair(**moe: Any) -> tuple[MoELayer, MoELayer]:
    """The same layer (same weights) once per kernel; d=6, hidden 8, rank 3 also need grouped_mm's padding."""
    loop = randomise_(make_layer(n_experts=N_EXPERTS, kernel="loop", **moe)).eval()
    grouped = make_layer(n_experts=N_EXPERTS, kernel="grouped_mm", **moe).eval()
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def forward_backward(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and every parameter gradient of one fwd+bwd."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, aux, _ = layer(x)
    (out.float() * grad).sum().add(aux).backward()
    return [out.float(), x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("router", "expert"), CASES)
def test_both_kernels_give_the_same_outputs_and_gradients(router: str, expert: str, precision: str) -> None:
    loop, grouped = kernel_pair(router=router, top_k=ROUTER_K[router], expert=expert)
    torch.manual_seed(2)
    x, grad = torch.randn(N_TOKENS, 6), torch.randn(N_TOKENS, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        expected, actual = forward_backward(loop, x, grad), forward_backward(grouped, x, grad)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if precision == "bf16" else {"rtol": 1e-5, "atol": 1e-5}
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **tolerance)


@pytest.mark.parametrize("expert", ["mlp", "lora"])
def test_both_kernels_agree_with_a_capacity_that_drops_slots(expert: str) -> None:
    loop, grouped = kernel_pair(router="softmax_topk", expert=expert, capacity_factor=0.5)
    torch.manual_seed(3)
    x, grad = torch.randn(16, 6), torch.randn(16, 6)
    poison = [torch.full((4096,), float("nan")) for _ in range(50)]  # freed blocks full of NaN: the dropped rows'
    del poison  # never-computed outputs now hold NaN every time, not by chance, and must still leak nothing
    expected, actual = forward_backward(loop, x, grad), forward_backward(grouped, x, grad)
    for a, e in zip(actual, expected, strict=True):
        assert torch.isfinite(a).all()  # dropped rows (never computed) leak nothing, not even NaN
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert float(grouped(x)[2].dropped_fraction) > 0


def test_auto_kernel_and_the_float64_fallback() -> None:
    x = torch.zeros(2, 4)
    assert resolve_kernel("auto", x) == AUTO_CPU_KERNEL
    assert resolve_kernel("grouped_mm", x) == "grouped_mm"
    assert resolve_kernel("grouped_mm", x.double()) == "loop"  # grouped_mm has no float64


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")


@contextmanager
def counting_host_reads() -> Iterator[dict[str, int]]:
    """Count every way Python code reads a tensor's value back to the host."""
    calls = dict.fromkeys(HOST_READS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name: str) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return originals[name](self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_counter_sees_host_reads() -> None:
    with counting_host_reads() as calls:
        float(torch.ones(()))
        torch.ones(2).tolist()
    assert calls["__float__"] == 1 and calls["tolist"] == 1


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize(("router", "expert"), CASES)
def test_grouped_mm_layer_reads_nothing_back(router: str, expert: str, capacity_factor: float | None) -> None:
    moe = {"router": router, "top_k": ROUTER_K[router], "expert": expert, "capacity_factor": capacity_factor}
    layer = make_layer(kernel="grouped_mm", **moe)
    x = torch.randn(32, 6, requires_grad=True)
    with counting_host_reads() as calls:
        out, aux, _ = layer.train()(x)
        (out.sum() + aux).backward()
    assert sum(calls.values()) == 0, calls


@pytest.mark.parametrize("backbone", ["lstm", "gpt"])
@pytest.mark.parametrize(("router", "expert"), [("noisy_topk", "mlp"), ("switch", "lora"), ("aux_free", "mlp")])
def test_training_steps_without_logging_read_nothing_back(backbone: str, router: str, expert: str) -> None:
    """Forward, backward, clip, fused AdamW and the routing tally: what the trainer does between log steps."""
    moe = {
        "router": router,
        "top_k": ROUTER_K[router],
        "expert": expert,
        "kernel": "grouped_mm",
        "capacity_factor": 1.25,
    }
    config = TrialConfig.model_validate(
        {
            "model": {"backbone": backbone, "d_model": 16, "n_layers": 2, "n_heads": 2},
            "moe": {"n_experts": 4, "d_hidden": 32, "lora_rank": 4} | moe,
        }
    )
    torch.manual_seed(0)
    model = build_model(config.model, config.moe, vocab_size=50).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    tally = RoutingTally(len(model.moe_layers()), 4, torch.device("cpu"))
    tokens = torch.randint(0, 50, (4, 13))
    with counting_host_reads() as calls:
        for _ in range(2):
            out = model(tokens[:, :-1], tokens[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            (out.loss + out.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimizer.step()
            tally.add(out.moe_stats)
    assert sum(calls.values()) == 0, calls
    assert set(tally.means()) >= {"dropped_fraction", "routing_entropy"}  # read once, at the log step


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("router", "expert"), CASES)
def test_cuda_grouped_mm_step_never_syncs(router: str, expert: str) -> None:
    layer = make_layer(d=64, d_hidden=128, router=router, top_k=ROUTER_K[router], expert=expert, capacity_factor=1.0)
    layer = layer.cuda().train()
    x = torch.randn(256, 64, device="cuda", requires_grad=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, aux, stats = layer(x)
        (out.float().sum() + aux).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(stats.dropped_fraction) >= 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("router", "expert"), CASES)
def test_cuda_kernels_agree_under_bf16(router: str, expert: str) -> None:
    loop, grouped = kernel_pair(router=router, top_k=ROUTER_K[router], expert=expert)
    loop, grouped = loop.cuda(), grouped.cuda()
    torch.manual_seed(2)
    x, grad = torch.randn(N_TOKENS, 6, device="cuda"), torch.randn(N_TOKENS, 6, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, actual = forward_backward(loop, x, grad), forward_backward(grouped, x, grad)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2)
