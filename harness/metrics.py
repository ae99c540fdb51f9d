"""Measurements a trial reports besides its losses: memory peaks and expert utilisation."""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from torch import Tensor

from models import MoEStats


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


class ResourceMonitor:
    """Background sampler of this process's peak RSS and, with a GPU, NVML memory.

    NVML memory is instantaneous, so a thread samples it. Two figures: ``gpu_mem_peak_nvml_mb`` is the
    device's ``used`` memory (every process on a shared GPU, plus the driver's own); and
    ``gpu_mem_peak_process_mb`` is this process's entry in ``nvmlDeviceGetComputeRunningProcesses``
    (CUDA context and allocator pool included), matched by :func:`nvml_visible_pid`. Without a GPU (or
    without NVML, or with no entry for this process) a figure is ``None`` ("no value"), never 0.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.2) -> None:
        self.device, self.interval_s = device, interval_s
        self._process = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-monitor", daemon=True)
        self._nvml_handle = self._open_nvml() if device.type == "cuda" else None
        self.peak_rss_bytes = self._process.memory_info().rss
        self.peak_gpu_bytes: int | None = None
        self.peak_gpu_process_bytes: int | None = None
        self._pid = nvml_visible_pid()

    def _open_nvml(self) -> object | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # no driver / library: record no value
            return None

    def _sample(self) -> None:
        self.peak_rss_bytes = max(self.peak_rss_bytes, self._process.memory_info().rss)
        if self._nvml_handle is not None:
            import pynvml

            used = int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
            self.peak_gpu_bytes = max(self.peak_gpu_bytes or 0, used)
            mine = [
                p.usedGpuMemory
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml_handle)
                if p.pid == self._pid and p.usedGpuMemory is not None  # None: NVML may not report it
            ]
            if mine:
                self.peak_gpu_process_bytes = max(self.peak_gpu_process_bytes or 0, int(sum(mine)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> ResourceMonitor:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> dict[str, float]:
        mib = 1024.0**2
        out = {"peak_rss_mb": self.peak_rss_bytes / mib}
        if self.peak_gpu_bytes is not None:
            out["gpu_mem_peak_nvml_mb"] = self.peak_gpu_bytes / mib
        if self.peak_gpu_process_bytes is not None:
            out["gpu_mem_peak_process_mb"] = self.peak_gpu_process_bytes / mib
        if self.device.type == "cuda":
            out["gpu_mem_peak_torch_mb"] = torch.cuda.max_memory_allocated(self.device) / mib
        return out


def nvml_visible_pid(status: Path = Path("/proc/self/status")) -> int:
    """This process's PID as NVML reports it: the outermost PID namespace's (first ``NSpid`` entry),
    which is the host PID inside a container; ``os.getpid()`` where procfs does not say."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[1])
    except OSError:  # no procfs (not Linux)
        pass
    return os.getpid()


@dataclass
class RoutingTally:
    """Accumulates routing statistics over steps, on device, without host syncs."""

    n_layers: int
    n_experts: int
    device: torch.device
    counts: Tensor = field(init=False)
    loss_sums: dict[str, Tensor] = field(init=False)
    entropy_sum: Tensor = field(init=False)
    dropped_sum: Tensor = field(init=False)
    calls: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.n_layers, self.n_experts, device=self.device)
        self.loss_sums = {}
        self.entropy_sum = torch.zeros((), device=self.device)
        self.dropped_sum, self.calls = torch.zeros((), device=self.device), 0

    def add(self, stats: list[MoEStats]) -> None:
        if not stats:
            return
        self.counts += torch.stack([s.counts for s in stats]).float()
        for s in stats:
            for name, value in s.loss_terms.items():
                self.loss_sums[name] = self.loss_sums.get(name, 0.0) + value
            self.entropy_sum = self.entropy_sum + s.entropy
            self.dropped_sum = self.dropped_sum + s.dropped_fraction
        self.calls += len(stats)

    def fractions(self) -> Tensor:
        """``[layers, experts]`` share of routed slots per expert."""
        return self.counts / self.counts.sum(-1, keepdim=True).clamp_min(1.0)

    def sums(self) -> dict[str, Tensor]:
        """Router loss terms, entropy and dropped fraction summed over calls, on the device (none before a call)."""
        if not self.calls:
            return {}
        return {**self.loss_sums, "routing_entropy": self.entropy_sum, "dropped_fraction": self.dropped_sum}

    def means(self) -> dict[str, float]:
        """The sums averaged over calls (one device-to-host copy)."""
        sums = self.sums()
        if not sums:
            return {}
        totals = torch.stack([total.double() for total in sums.values()]).tolist()  # float64: exact for fp32/bf16
        return {name: total / self.calls for name, total in zip(sums, totals, strict=True)}


def utilisation_summary(fractions: Tensor, prefix: str) -> dict[str, float]:
    """Per-layer load CV and normalised entropy of the token shares.

    Each expert's share is in the utilisation tables (CSV artifacts, the report), not a metric of its own:
    as single-value metrics they were most of a trial's charts in the MLflow UI.
    """
    out: dict[str, float] = {}
    n_experts = fractions.size(-1)
    for layer, row in enumerate(fractions.cpu()):
        mean = float(row.mean())
        out[f"{prefix}_cv_l{layer}"] = float(row.std(correction=0)) / mean if mean > 0 else 0.0
        p = row.clamp_min(1e-12)
        out[f"{prefix}_entropy_l{layer}"] = (
            float(-(row * p.log()).sum()) / math.log(n_experts) if n_experts > 1 else 1.0
        )
    return out
