"""The MoE layer's maths: losses, routers, dispatch, experts, gradients, and the layer benchmark."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from harness.bench.roofline import layer_cost
from models import losses
from models.config import MoEConfig
from models.dispatch import capacity_for, plan_dispatch
from models.experts import LoRAExperts, MLPExperts
from models.grouped import ExpertGroups, GroupedFFN, GroupedLowRank
from models.moe import MoELayer
from models.routers import AuxFreeRouter, NoisyTopKRouter

REPO = Path(__file__).resolve().parents[1]
D = 6
ROUTER_K = {"noisy_topk": 2, "switch": 1, "softmax_topk": 2, "aux_free": 2}


def make_layer(d: int = D, **moe: object) -> MoELayer:
    defaults: dict[str, object] = {"n_experts": 4, "top_k": 2, "d_hidden": 8, "lora_rank": 3}
    return MoELayer(d, MoEConfig(**(defaults | moe)))


def groups_of(counts: list[int]) -> ExpertGroups:
    """Groups of the given sizes, laid out back to back (what ``plan_dispatch`` builds from routing)."""
    sizes = torch.tensor(counts)
    return ExpertGroups(
        sizes, torch.cumsum(sizes, 0).to(torch.int32), torch.repeat_interleave(torch.arange(len(counts)), sizes)
    )


def randomise_(layer: MoELayer, scale: float = 0.5) -> MoELayer:
    """Non-trivial weights everywhere (LoRA B and the noisy router start at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return layer


# ---------------------------------------------------------------- losses against hand-computed values


def test_cv_squared_is_population_variance_over_mean_squared() -> None:
    assert losses.cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx((2 / 3) / 4)
    assert losses.cv_squared(torch.tensor([5.0])).item() == 0.0


def test_importance_load_loss_hand_computed() -> None:
    gates = torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0]])  # importance = [0.6, 1.4, 0.0]
    load = torch.tensor([1.0, 2.0, 0.0])
    importance_cv2 = (((0.6 - 2 / 3) ** 2 + (1.4 - 2 / 3) ** 2 + (2 / 3) ** 2) / 3) / (2 / 3) ** 2
    load_cv2 = (2 / 3) / 1.0
    assert losses.importance_load_loss(gates, load).item() == pytest.approx(importance_cv2 + load_cv2, rel=1e-6)


def test_switch_loss_hand_computed_top1_and_top2() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])  # P = [0.4, 0.4, 0.2]
    top1 = torch.tensor([[0], [1]])  # f = [1/2, 1/2, 0]
    assert losses.switch_balance_loss(probs, top1).item() == pytest.approx(3 * (0.5 * 0.4 + 0.5 * 0.4))
    top2 = torch.tensor([[0, 1], [1, 2]])  # every slot counts: f = [1/4, 2/4, 1/4]
    assert losses.switch_balance_loss(probs, top2).item() == pytest.approx(3 * (0.25 * 0.4 + 0.5 * 0.4 + 0.25 * 0.2))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_switch_loss_is_one_for_a_uniform_router(top_k: int) -> None:
    n_experts, n_tokens = 4, 8
    probs = torch.full((n_tokens, n_experts), 1 / n_experts)
    index = (torch.arange(n_tokens * top_k) % n_experts).view(n_tokens, top_k)  # each expert equally often
    assert losses.switch_balance_loss(probs, index).item() == pytest.approx(1.0)


def test_router_z_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp = ln 2, ln 4
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert losses.router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_layer_combines_the_selected_losses_with_their_coefficients() -> None:
    layer = randomise_(make_layer(balance_losses=["cv2", "switch"], aux_loss_coef=0.1, z_loss_coef=0.01)).eval()
    _, aux, stats = layer(torch.randn(10, D))
    t = stats.loss_terms
    expected = 0.1 * (t["balance_cv2"] + t["balance_switch"]) + 0.01 * t["z"]
    assert set(t) == {"balance_cv2", "balance_switch", "z"}
    assert aux.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- noisy top-k (Shazeer et al. 2017)


def _noisy_router(n_experts: int = 5, top_k: int = 2) -> NoisyTopKRouter:
    router = NoisyTopKRouter(D, MoEConfig(n_experts=n_experts, top_k=top_k))
    torch.manual_seed(3)
    with torch.no_grad():
        router.gate.weight.normal_()
        router.noise.weight.normal_()
    return router


def test_noisy_topk_load_matches_the_paper_formula() -> None:
    """load_i = sum_x Phi((clean_i - kth_excluding(H, k, i)) / softplus(x W_noise)_i), eq. 8-10."""
    router, top_k = _noisy_router(), 2
    x = torch.randn(7, D)
    torch.manual_seed(11)
    routing = router(x)
    torch.manual_seed(11)
    noise = torch.randn(7, 5)  # the router draws exactly this after its clean logits
    clean = x @ router.gate.weight.t()
    std = F.softplus(x @ router.noise.weight.t()) + 1e-2
    noisy = clean + noise * std
    expected = torch.zeros(5)
    for t in range(7):
        for i in range(5):
            others = torch.cat((noisy[t, :i], noisy[t, i + 1 :]))
            kth_excluding = others.sort(descending=True).values[top_k - 1]
            expected[i] += torch.distributions.Normal(0.0, 1.0).cdf((clean[t, i] - kth_excluding) / std[t, i])
    torch.testing.assert_close(routing.load, expected, rtol=1e-5, atol=1e-5)
    # Gates: top-k of the noisy logits, softmax over the k.
    top = noisy.topk(top_k, dim=-1)
    torch.testing.assert_close(routing.expert_index, top.indices)
    torch.testing.assert_close(routing.combine_weight, torch.softmax(top.values, -1), rtol=1e-5, atol=1e-6)


def test_noisy_topk_load_is_differentiable() -> None:
    router = _noisy_router().train()
    load = router(torch.randn(16, D)).load
    (load * torch.arange(5.0)).sum().backward()
    for weight in (router.gate.weight, router.noise.weight):
        assert weight.grad is not None and weight.grad.abs().sum() > 0 and torch.isfinite(weight.grad).all()


def test_noisy_topk_noise_only_in_training_and_seeded() -> None:
    router, x = _noisy_router(), torch.randn(32, D)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.combine_weight, b.combine_weight)
    assert torch.equal(a.expert_index, (x @ router.gate.weight.t()).topk(2, -1).indices)
    router.train()
    torch.manual_seed(5)
    c = router(x)
    torch.manual_seed(5)
    d = router(x)
    e = router(x)  # a different draw
    assert torch.equal(c.combine_weight, d.combine_weight) and torch.equal(c.load, d.load)
    assert not torch.equal(c.combine_weight, e.combine_weight)
    assert not torch.equal(c.combine_weight, a.combine_weight)


def test_router_init_options() -> None:
    d = 400
    switch = MoELayer(d, MoEConfig(router="switch", top_k=1, router_init="switch")).router.gate.weight
    std = math.sqrt(0.1 / d)  # Fedus et al.: truncated normal, std sqrt(s / fan_in) with s = 0.1
    assert switch.abs().max() <= 2 * std and 0.7 * std < switch.std() < 1.1 * std
    assert torch.count_nonzero(MoELayer(d, MoEConfig()).router.gate.weight) == 0  # noisy top-k: zeros
    assert torch.count_nonzero(MoELayer(d, MoEConfig(router="softmax_topk")).router.gate.weight) > 0


def test_switch_jitter_only_in_training() -> None:
    layer = randomise_(make_layer(router="switch", top_k=1, jitter=0.2))
    x = torch.randn(64, D)
    clean = torch.softmax(x @ layer.router.gate.weight.t(), -1)
    layer.eval()
    torch.testing.assert_close(layer.router(x).probs, clean)
    layer.train()
    torch.manual_seed(0)
    jittered = layer.router(x).probs
    assert not torch.allclose(jittered, clean)
    torch.manual_seed(0)
    torch.testing.assert_close(layer.router(x).probs, jittered)


# ---------------------------------------------------------------- dispatch and capacity


def test_capacity_formula() -> None:
    assert capacity_for(10, 4, 2, 1.0) == 5  # ceil(1.0 * 2 * 10 / 4)
    assert capacity_for(10, 3, 1, 1.25) == 5  # ceil(4.1666)
    assert capacity_for(10, 3, 1, None) is None


def test_capacity_drops_exactly_the_slots_beyond_capacity_rank_major() -> None:
    # Rank-major priority: every token's first choice, in token order, before any second choice.
    index = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1]])  # expert 0 gets t0, t2, t3 (1st) and t1 (2nd)
    capacity = capacity_for(4, 3, 2, 1.0)
    assert capacity == 3
    plan = plan_dispatch(index, 3, capacity)
    assert plan.kept is not None
    kept = {(int(s) // 4, int(s) % 4) for s in plan.slot_order[plan.kept]}  # (rank, token)
    assert kept == {(0, 0), (0, 2), (0, 3), (0, 1), (1, 0), (1, 3), (1, 2)}  # only (rank 1, token 1) dropped
    assert plan.slot_order[~plan.kept].tolist() == [1 * 4 + 1]  # the dropped slot sits behind every group
    assert plan.groups.counts.tolist() == [3, 3, 1]
    assert float(plan.dropped_fraction) == pytest.approx(1 / 8)


def test_capacity_in_the_layer_zeroes_dropped_tokens_and_logs_the_fraction() -> None:
    layer = randomise_(make_layer(n_experts=2, top_k=1, router="switch", capacity_factor=1.0)).eval()
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 10.0  # tokens with x_0 > 0 prefer expert 0
    x = torch.randn(12, D)
    x[:, 0] = torch.tensor([1.0] * 9 + [-1.0] * 3)  # 9 tokens want expert 0; capacity = ceil(12/2) = 6
    out, _, stats = layer(x)
    assert float(stats.dropped_fraction) == pytest.approx(3 / 12)
    assert torch.all(out[6:9] == 0)  # the 7th-9th tokens of expert 0 are dropped, in token order
    assert torch.all(out[:6].abs().sum(-1) > 0) and torch.all(out[9:].abs().sum(-1) > 0)


def _expert_by_hand(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """One token through expert e, written from the definitions (independent of the grouped kernels)."""
    cfg, experts = layer.config, layer.experts

    def act(h: torch.Tensor) -> torch.Tensor:
        if cfg.activation == "swiglu":
            gate, up = h[: h.numel() // 2], h[h.numel() // 2 :]
            return gate * torch.sigmoid(gate) * up
        if cfg.activation == "gelu":
            return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        return torch.clamp(h, min=0)

    if isinstance(experts, MLPExperts):
        return act(x @ experts.w_in[e] + experts.b_in[e]) @ experts.w_out[e] + experts.b_out[e]
    base = experts.base.w_out(act(experts.base.w_in(x)))
    return base + experts.scale * (x @ experts.lora_a[e]) @ experts.lora_b[e]


LOOP_CASES = [{"router": r, "top_k": k, "expert": e} for r, k in ROUTER_K.items() for e in ("mlp", "lora")] + [
    {"activation": "gelu"},
    {"activation": "swiglu", "expert": "lora"},
    {"activation": "swiglu", "granularity": 2, "n_shared_experts": 1},
    {"expert": "lora", "n_shared_experts": 2, "router": "switch", "top_k": 1},
]


@pytest.mark.parametrize("moe", LOOP_CASES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_layer_equals_an_explicit_per_token_loop(moe: dict[str, object]) -> None:
    layer = randomise_(make_layer(**moe)).eval()
    x = torch.randn(9, D)
    out, _, _ = layer(x)
    routing = layer.router(x)
    with torch.no_grad():
        for t in range(x.size(0)):
            expected = torch.zeros(D)
            for e, w in zip(routing.expert_index[t].tolist(), routing.combine_weight[t].tolist(), strict=True):
                expected += w * _expert_by_hand(layer, e, x[t])
            if layer.shared_experts is not None:
                expected += layer.shared_experts(x[t])
            torch.testing.assert_close(out[t], expected, rtol=1e-4, atol=1e-5)


def test_fine_grained_and_shared_experts_shapes_and_active_parameters() -> None:
    coarse = make_layer(n_experts=4, top_k=1, d_hidden=8)
    fine = make_layer(n_experts=4, top_k=1, d_hidden=8, granularity=2, n_shared_experts=1)
    assert fine.n_experts == 8 and fine.top_k == 2 and fine.experts.w_in.shape == (8, D, 4)
    assert fine.shared_experts is not None and fine.shared_experts.w_in.out_features == 4
    # Equal routed active compute: k*g experts of width d_hidden/g; the shared expert adds its own.
    routed = lambda m: m.active_params() - sum(p.numel() for p in m.router.parameters())  # noqa: E731
    shared = sum(p.numel() for p in fine.shared_experts.parameters())
    assert routed(fine) - shared == routed(coarse) + D  # one extra output bias per extra active expert


# ---------------------------------------------------------------- experts


def test_lora_zero_b_reproduces_the_base_exactly() -> None:
    layer = make_layer(expert="lora", router="softmax_topk").eval()  # B is zero-initialised
    experts = layer.experts
    assert isinstance(experts, LoRAExperts) and torch.count_nonzero(experts.lora_b) == 0
    x = torch.randn(11, D)
    every = experts.forward_every_expert(x)
    assert torch.equal(every, experts.base(x).unsqueeze(1).expand_as(every))
    assert torch.equal(experts(x, groups_of([3, 0, 6, 2])), torch.zeros(11, D))
    torch.testing.assert_close(layer(x)[0], experts.base(x))  # renormalised weights sum to one


def test_lora_rank_alpha_and_frozen_or_trainable_base() -> None:
    frozen = make_layer(expert="lora", lora_rank=3, lora_alpha=6.0).experts
    assert frozen.lora_a.shape == (4, D, 3) and frozen.lora_b.shape == (4, 3, D) and frozen.scale == 2.0
    assert not any(p.requires_grad for p in frozen.base.parameters())
    trainable = make_layer(expert="lora", lora_base_trainable=True).experts
    assert all(p.requires_grad for p in trainable.base.parameters())


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
@pytest.mark.parametrize("expert", ["mlp", "lora"])
def test_grouped_experts_equal_every_expert_reference(expert: str, kernel: str) -> None:
    layer = randomise_(make_layer(expert=expert, activation="swiglu", kernel=kernel))
    counts = [2, 0, 4, 3]
    x = torch.randn(9, D)
    owner = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    reference = layer.experts.forward_every_expert(x)[torch.arange(9), owner]
    if expert == "lora":
        reference = reference - layer.experts.base(x)
    torch.testing.assert_close(layer.experts(x, groups_of(counts)), reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_grouped_kernels_gradcheck_with_an_idle_expert(activation: str) -> None:
    torch.manual_seed(0)
    counts, width = [3, 0, 4], 10 if activation == "swiglu" else 5
    f64 = {"dtype": torch.float64, "requires_grad": True}
    x = torch.randn(7, 4, **f64)
    ffn = (torch.randn(3, 4, width, **f64), torch.randn(3, width, **f64))
    ffn += (torch.randn(3, 5, 4, **f64), torch.randn(3, 4, **f64))
    assert torch.autograd.gradcheck(lambda *t: GroupedFFN.apply(*t, counts, activation), (x, *ffn))
    low_rank = (torch.randn(3, 4, 2, **f64), torch.randn(3, 2, 4, **f64))
    assert torch.autograd.gradcheck(lambda *t: GroupedLowRank.apply(*t, counts), (x, *low_rank))
    # The idle expert gets an exact zero gradient (its buffer slice is not left uninitialised).
    GroupedFFN.apply(x, *ffn, counts, activation).sum().backward()
    assert all(torch.count_nonzero(p.grad[1]) == 0 for p in ffn)


GRAD_CASES = [(r, e) for r in ROUTER_K for e in ("mlp", "lora")]


@pytest.mark.parametrize(("router", "expert"), GRAD_CASES)
def test_float64_gradcheck_every_router_and_expert(router: str, expert: str) -> None:
    layer = randomise_(
        make_layer(
            d=4,
            n_experts=3,
            top_k=ROUTER_K[router],
            router=router,
            expert=expert,
            d_hidden=5,
            lora_rank=2,
            jitter=0.01 if router == "switch" else 0.0,
            bias_update_rate=0.0,  # the bias update is a side effect; gradcheck needs a pure function
            balance_losses=["cv2", "switch"],
            z_loss_coef=0.01,
            n_shared_experts=1,
            lora_base_trainable=True,
        )
    ).double()
    layer.train()
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = tuple(dict(layer.named_parameters())[n].detach().clone().requires_grad_() for n in names)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)  # same noise / jitter on every evaluation
        out, aux, _ = torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (x,))
        return out, aux

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize(("router", "expert"), GRAD_CASES)
def test_gradients_reach_router_and_experts(router: str, expert: str) -> None:
    layer = randomise_(make_layer(router=router, top_k=ROUTER_K[router], expert=expert, balance_losses=["switch"]))
    layer.train()
    out, aux, _ = layer(torch.randn(32, D))
    (out.pow(2).sum() + aux).backward()
    assert layer.router.gate.weight.grad is not None and layer.router.gate.weight.grad.abs().sum() > 0
    expert_params = [layer.experts.lora_a, layer.experts.lora_b] if expert == "lora" else [layer.experts.w_in]
    for p in expert_params:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("expert", ["mlp", "lora"])
def test_router_runs_in_float32_under_bf16_autocast(expert: str) -> None:
    layer = randomise_(make_layer(expert=expert))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.router(torch.randn(8, D))
        out, aux, _ = layer(torch.randn(8, D))
    assert routing.logits.dtype == torch.float32 and routing.combine_weight.dtype == torch.float32
    assert out.dtype == torch.bfloat16 and aux.dtype == torch.float32 and torch.isfinite(out).all()
    (out.float().sum() + aux).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters() if p.requires_grad)


# ---------------------------------------------------------------- auxiliary-loss-free balancing


def _load_cv(rate: float, steps: int = 150) -> tuple[float, float]:
    router = AuxFreeRouter(D, MoEConfig(n_experts=4, top_k=1, router="aux_free", bias_update_rate=rate)).train()
    torch.manual_seed(0)
    with torch.no_grad():
        router.gate.weight.normal_(0.0, 0.1)
        router.gate.weight[0] += 1.0  # skewed: with x around +1, expert 0 wins almost every token
    x = torch.randn(256, D) * 0.5 + 1.0
    cvs = []
    for _ in range(steps):
        counts = torch.bincount(router(x).expert_index.view(-1), minlength=4).float()
        router.update_bias()  # one forward per optimiser step, as in the trainer
        cvs.append(float(counts.std(correction=0) / counts.mean()))
    return cvs[0], cvs[-1]


def test_aux_free_bias_update_reduces_load_cv() -> None:
    first, last = _load_cv(rate=0.01)
    assert first > 1.0  # really skewed
    assert last < 0.3 * first
    frozen_first, frozen_last = _load_cv(rate=0.0)  # no update: the skew stays
    assert frozen_last == pytest.approx(frozen_first)


def test_aux_free_bias_does_not_move_in_eval() -> None:
    router = AuxFreeRouter(D, MoEConfig(n_experts=4, top_k=1, router="aux_free")).eval()
    router(torch.randn(16, D) + 1)
    assert torch.count_nonzero(router.selection_bias) == 0


# ---------------------------------------------------------------- the benchmark command


@pytest.mark.slow  # two interpreter start-ups (the allocator re-exec) plus timing: ~10 s on the shared CPU
def test_bench_moe_quick_writes_the_required_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "harness", "bench", "moe", "--quick", "--experts", "4", "8", "--tokens", "128"]
    cmd += ["--d-model", "16", "--d-hidden", "32", "--repeats", "1", "--json", str(out)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 2 * 2  # E x k x expert type x kernel
    required = {"experts", "top_k", "expert_type", "tokens", "moe_ms", "dense_ms", "naive_ms", "kernel"}
    required |= {"flops", "bytes", "bound_ms"}
    for row in rows:
        assert required <= row.keys()
        assert row["expert_type"] in {"mlp", "lora"} and row["tokens"] == 128
        assert all(row[k] > 0 for k in ("moe_ms", "dense_ms", "naive_ms", "flops", "bytes", "bound_ms"))
        assert row["time_over_bound"] == pytest.approx(row["moe_ms"] / row["bound_ms"])
    assert {(r["experts"], r["top_k"], r["expert_type"], r["kernel"]) for r in rows} == {
        (e, k, t, kernel) for e in (4, 8) for k in (1, 2) for t in ("mlp", "lora") for kernel in ("loop", "grouped_mm")
    }
    assert "moe/dense" in result.stdout and "MALLOC_MMAP_MAX_=0" in result.stdout
    assert "t/bound" in result.stdout and "GB/s" in result.stdout


@pytest.mark.parametrize("expert_type", ["mlp", "lora"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_cost_flops_are_what_torch_counts_on_the_layer(top_k: int, expert_type: str) -> None:
    """The roofline's FLOPs for one MoE layer's forward + backward (the bench's routers: switch for k=1, softmax
    top-k otherwise) against torch's counter on that layer; the bytes moved are a model, not counted."""
    tokens, experts, d, h, rank = 64, 4, 16, 32, 4
    router = "switch" if top_k == 1 else "softmax_topk"
    config = MoEConfig(n_experts=experts, top_k=top_k, router=router, expert=expert_type, d_hidden=h, lora_rank=rank)
    layer = MoELayer(d, config)
    x = torch.randn(tokens, d, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out, aux, _ = layer(x)
        (out.sum() + aux).backward()
    flops, moved = layer_cost(
        tokens=tokens, experts=experts, top_k=top_k, expert_type=expert_type, d=d, h=h, rank=rank, itemsize=4
    )
    assert flops == pytest.approx(counter.get_total_flops(), rel=0.01) and moved > 0
