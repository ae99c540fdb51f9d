"""The training benchmarks: `harness bench train|levers` output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from harness.bench import device
from harness.cli import main
from harness.config import TrialConfig, load_spec
from harness.matrix import expand
from models import build_model
from tests.studies import tiny_spec

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "studies" / "tiny.yaml")
VOCAB = 500
LORA_SWITCH = {"router": "switch", "top_k": 1, "expert": "lora", "balance_losses": ["switch"]}


def test_bench_train_json_has_the_issue_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "train",
            TINY,
            "--variants",
            "hybrid",
            "--steps",
            "4",
            "--warmup",
            "2",
            "--rounds",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["hybrid"]
    row = rows[0]
    for key in ("tokens_per_s", "ms_per_mtok", "flops_per_s", "gemm_peak_flops_per_s", "minimal_loop_tokens_per_s"):
        assert row[key] > 0, key
    assert row["ms_per_mtok"] == pytest.approx(1e9 / row["tokens_per_s"])
    assert row["fraction_of_peak"] == pytest.approx(row["flops_per_s"] / row["gemm_peak_flops_per_s"])
    assert "trainer/minimal" in capsys.readouterr().out


def test_bench_train_default_adds_dense_and_rejects_bad_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "train", TINY, "--set", "train.precision=fp64", "--steps", "2", "--warmup", "2"]) == 2
    err = capsys.readouterr().err
    assert "train.precision" in err or "fp64" in err
    assert main(["bench", "train", TINY, "--set", "nonsense", "--steps", "2", "--warmup", "2"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_bench_levers_times_each_lever(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = yaml.safe_load(Path(TINY).read_text())
    spec["base"]["model"]["adaptive_cutoffs"] = [200, 1000]  # the tiny spec caps the vocabulary at 2000
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(
        [
            "bench",
            "levers",
            str(path),
            "--levers",
            "adaptive softmax",
            "bf16 autocast",
            "--steps",
            "2",
            "--warmup",
            "2",
            "--skip-end-to-end",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for label in ("plain (fp32, full softmax)", "adaptive softmax", "bf16 autocast"):
        assert label in out


@pytest.mark.parametrize("backbone", ["lstm", "gpt"])
@pytest.mark.parametrize("output", ["full", "adaptive"])
def test_bf16_autocast_trains_with_either_output_head(backbone: str, output: str) -> None:
    model = {"backbone": backbone, "d_model": 32, "n_heads": 2, "output": output, "tie_weights": output == "full"}
    if output == "adaptive":
        model["adaptive_cutoffs"] = [50, 200]
    config = TrialConfig.model_validate(
        {"variant": "hybrid", "model": model, "moe": {"d_hidden": 64, "n_experts": 4, **LORA_SWITCH}}
    )
    lm = build_model(config.model, config.moe, VOCAB)
    x, y = torch.randint(0, VOCAB, (4, 8)), torch.randint(0, VOCAB, (4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm(x, y, lm.initial_state(4))
    (out.loss + out.aux_loss).backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_the_device_check_without_cuda_says_what_it_would_measure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this path on every machine, a GPU one too
    assert main(["bench", "device"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no CUDA device here: nothing measured.")
    steps = ["cuda tests", "bench moe fp32", "bench moe bf16", "bench train bf16+compile"]
    for step in [*steps, "ablation slice", "gpt-gpu slice"]:
        assert f"  {step} (at most" in out
    assert sum(step.limit_s for step in device.plan(tmp_path)) <= 9 * 60
    device.write_slice_specs(tmp_path)
    for part in device.SLICES:  # each slice is a valid study: its cells at one seed and a fixed budget, on CUDA
        cells = expand(load_spec(tmp_path / f"{part.name}.yaml"))
        assert [cell.variant for cell in cells] == part.variants
        assert {(cell.config.budget.tokens, cell.config.train.device) for cell in cells} == {(part.tokens, "cuda")}


@pytest.mark.slow
def test_bench_study_splits_each_cell_s_run_duration_into_its_phases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tiny_spec(tmp_path, "split", ["baseline", "plain"], [0])
    out = tmp_path / "split.json"
    assert main(["bench", "study", str(spec), "--keep", str(tmp_path / "store"), "--json", str(out)]) == 0
    assert "start-up" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [row["cell"] for row in result["cells"]] == ["baseline/seed=0", "plain/seed=0"]  # in start order
    for row in result["cells"]:
        assert row["train"] > 0 and row["final_eval"] > 0 and row["setup"] > 0
        assert -0.05 < row["other"] < row["wall"]  # the phases fit inside the run's duration
    study = result["study"]
    assert study["startup"] > 0 and study["tail"] >= 0
    assert study["startup"] + study["cells"] + study["tail"] <= study["command"] + 0.1  # one cell at a time
