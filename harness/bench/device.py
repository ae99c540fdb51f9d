"""``harness bench device``: every GPU figure the project needs, in one call, on the first CUDA machine it meets.

Device time is scarce (a lent GPU for minutes), so the check is prepared before the device: one command that runs,
each step in its own process under its own time limit (a step that fails or hangs costs only its share):

1. the CUDA-marked tests (``pytest -m cuda``: the grouped_mm kernel never syncs the host, both kernels agree in bf16);
2. ``bench moe`` on CUDA in fp32 and bf16, both kernels, time against the roofline bound from the GPU's measured
   GEMM peak and copy bandwidth;
3. ``bench train`` of the ablation study's hybrid and baseline with bf16 and ``torch.compile``;
4. slices of ``studies/ablation.yaml`` (baseline, switch, hybrid) and ``studies/gpt-gpu.yaml`` (top2, fine_shared;
   bf16, compiled) through ``run-study``, one seed and a fixed token budget each, whose runs hold tokens/s and the
   NVML figures (device and process) beside torch's allocator peak.

It writes one JSON (every step's command, exit status, seconds and figures) and prints a summary table. On a
machine without CUDA it prints what it would measure and exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tabulate import tabulate

REPO = Path(__file__).resolve().parents[2]
ABLATION = REPO / "studies" / "ablation.yaml"


@dataclass(frozen=True)
class Slice:
    """A few cells of a shipped study: one seed, ``tokens`` per cell, no mid-run checkpoints."""

    study: str
    variants: list[str]
    tokens: int
    limit_s: int

    @property
    def name(self) -> str:
        return f"{self.study}-slice"

    def spec(self) -> dict[str, Any]:
        spec = yaml.safe_load((REPO / "studies" / f"{self.study}.yaml").read_text())
        spec["name"] = self.name
        spec["matrix"] = {"variants": self.variants, "seeds": [1]}
        spec.pop("design", None)  # one seed decides nothing; the slice measures speed and memory
        spec["base"]["budget"] |= {"tokens": self.tokens, "epochs": None, "checkpoint_every_steps": 1_000_000}
        spec["base"]["train"] |= {"device": "cuda"}
        return spec


SLICES = [
    Slice("ablation", ["baseline", "switch", "hybrid"], 200_000, 120),
    Slice("gpt-gpu", ["top2", "fine_shared"], 300_000, 120),
]
NVML_KEYS = ("gpu_mem_peak_nvml_mb", "gpu_mem_peak_process_mb", "gpu_mem_peak_torch_mb", "train_tokens_per_s")


@dataclass
class Step:
    """One part of the check: a command, its time limit, and the JSON file it leaves (None: its output only)."""

    name: str
    command: list[str]
    limit_s: int
    json_file: str | None = None
    status: int | None = None
    seconds: float | None = None
    figures: Any = None
    tail: str = ""


@dataclass
class Check:
    device: str
    steps: list[Step] = field(default_factory=list)


def plan(folder: Path, python: str = sys.executable) -> list[Step]:
    """The steps, writing their files under ``folder``; their limits add up to 9 minutes."""
    harness = [python, "-m", "harness"]
    steps = [Step("cuda tests", [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], 60)]
    for precision in ("fp32", "bf16"):
        json_file = str(folder / f"moe-{precision}.json")
        command = [*harness, "bench", "moe", "--device", "cuda", "--precision", precision, "--json", json_file]
        steps.append(Step(f"bench moe {precision}", command, 70, json_file))
    train_json = str(folder / "train-bf16-compile.json")
    sets = ["--set", "train.precision=bf16", "--set", "train.compile=true", "--set", "train.device=cuda"]
    command = [*harness, "bench", "train", str(ABLATION), "--variants", "baseline", "hybrid", *sets, "--json"]
    steps.append(Step("bench train bf16+compile", [*command, train_json], 100, train_json))
    for part in SLICES:
        slice_command = [*harness, "run-study", str(folder / f"{part.name}.yaml"), "--tracking-uri"]
        slice_command += [slice_store(folder), "--no-progress", "--checkpoint-dir", str(folder / "slice" / "ck")]
        steps.append(Step(f"{part.study} slice", slice_command, part.limit_s))
    return steps


def slice_store(folder: Path) -> str:
    return f"sqlite:///{folder / 'slice' / 'mlflow.db'}"


def write_slice_specs(folder: Path) -> None:
    for part in SLICES:
        (folder / f"{part.name}.yaml").write_text(yaml.safe_dump(part.spec(), sort_keys=False))


def slice_figures(store: str, part: Slice) -> list[dict[str, Any]]:
    """Per cell of the slice: tokens/s and the memory figures its run recorded."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(part.name)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'trial'")
    return [
        {"cell": run.data.tags["harness.cell"], "status": run.info.status}
        | {key: run.data.metrics.get(key) for key in NVML_KEYS}
        for run in runs
    ]


def run_step(step: Step) -> None:
    start = time.monotonic()
    try:
        done = subprocess.run(step.command, cwd=REPO, capture_output=True, text=True, timeout=step.limit_s)
        step.status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        step.status, output = 124, f"{expired.stdout or ''}{expired.stderr or ''}timed out after {step.limit_s} s"
    step.seconds = round(time.monotonic() - start, 1)
    step.tail = output[-2000:] if isinstance(output, str) else ""
    if step.json_file and Path(step.json_file).exists():
        step.figures = json.loads(Path(step.json_file).read_text())


def summary(check: Check) -> str:
    rows = [[s.name, s.status, s.seconds, headline(s)] for s in check.steps]
    return tabulate(rows, headers=["step", "exit", "seconds", "figures"])


def headline(step: Step) -> str:
    """The step's headline figures, one line."""
    figures = step.figures
    if not figures:
        return step.tail.strip().splitlines()[-1][:100] if step.tail.strip() else ""
    if step.name.startswith("bench moe"):
        ratios = [row["time_over_bound"] for row in figures if row.get("time_over_bound") is not None]
        within = sum(ratio <= 1.5 for ratio in ratios)
        if not ratios:
            return ""
        return f"{len(figures)} rows; time/bound {min(ratios):.2f}-{max(ratios):.2f}; {within} at most 1.5"
    if step.name.startswith("bench train"):
        return "; ".join(
            f"{r['variant']} {r['tokens_per_s']:,.0f} tok/s {100 * r['fraction_of_peak']:.0f}% peak" for r in figures
        )
    return "; ".join(
        f"{r['cell']} {r['train_tokens_per_s'] or 0:,.0f} tok/s, NVML {r['gpu_mem_peak_process_mb'] or 0:,.0f} MB "
        f"(torch {r['gpu_mem_peak_torch_mb'] or 0:,.0f} MB)"
        for r in figures
    )


def cmd_bench_device(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing measured. On a CUDA machine this check runs, in under 9 minutes:")
        for step in plan(Path(args.folder or "FOLDER")):
            print(f"  {step.name} (at most {step.limit_s} s): {' '.join(step.command[1:])}")
        print(f"and writes every figure to one JSON ({args.json or 'FOLDER/device-check.json'}).")
        return 0
    folder = Path(args.folder or tempfile.mkdtemp(prefix="device-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    check = Check(device=torch.cuda.get_device_name(0), steps=plan(folder))
    write_slice_specs(folder)
    slices = {f"{part.study} slice": part for part in SLICES}
    for step in check.steps:
        print(f"{step.name} ...", flush=True)
        run_step(step)
        if step.name in slices:
            step.figures = slice_figures(slice_store(folder), slices[step.name])
    out = Path(args.json or folder / "device-check.json")
    out.write_text(json.dumps(asdict(check), indent=2) + "\n")
    print(f"device: {check.device}")
    print(summary(check))
    print(f"wrote {out}")
    return 0 if all(step.status == 0 for step in check.steps) else 1


def register(bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser("device", help="every CUDA figure in one call (tests, bench moe/train, NVML, a slice)")
    parser.add_argument("--json", help="where to write the figures (default: device-check.json in the folder)")
    parser.add_argument("--folder", help="working folder for the steps' files (default: a new temporary one)")
    parser.set_defaults(func=cmd_bench_device)
