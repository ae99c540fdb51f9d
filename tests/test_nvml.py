"""GPU memory through NVML, with a fake ``pynvml`` (no GPU here): this process's figure beside the device's."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from harness.metrics import ResourceMonitor, nvml_visible_pid

MIB = 1024**2


def fake_pynvml(processes: list[tuple[int, int | None]], device_used: int) -> types.ModuleType:
    """A ``pynvml`` whose GPU 0 runs the given (pid, bytes) processes; ``None`` bytes: not reported."""
    module = types.ModuleType("pynvml")
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=device_used, total=80_000 * MIB)
    module.nvmlDeviceGetComputeRunningProcesses = lambda handle: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in processes
    ]
    return module


@pytest.fixture
def no_cuda_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 100 * MIB)


def test_process_figure_is_this_process_only_beside_the_device_figure(
    monkeypatch: pytest.MonkeyPatch, no_cuda_calls: None
) -> None:
    me = nvml_visible_pid()
    others = [(me + 1, 5000 * MIB), (me + 2, None)]  # another job's memory, and one NVML cannot attribute
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([*others, (me, 700 * MIB)], device_used=6000 * MIB))
    monitor = ResourceMonitor(torch.device("cuda", 0), interval_s=60)
    with monitor:
        pass
    summary = monitor.summary()
    assert summary["gpu_mem_peak_process_mb"] == 700
    assert summary["gpu_mem_peak_nvml_mb"] == 6000
    assert summary["gpu_mem_peak_torch_mb"] == 100


def test_no_entry_for_this_process_or_no_gpu_gives_no_value(
    monkeypatch: pytest.MonkeyPatch, no_cuda_calls: None
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([(nvml_visible_pid() + 1, 5000 * MIB)], 5000 * MIB))
    monitor = ResourceMonitor(torch.device("cuda", 0), interval_s=60)
    with monitor:
        pass
    assert "gpu_mem_peak_process_mb" not in monitor.summary() and monitor.summary()["gpu_mem_peak_nvml_mb"] == 5000
    cpu = ResourceMonitor(torch.device("cpu"), interval_s=60)
    with cpu:
        pass
    assert set(cpu.summary()) == {"peak_rss_mb"}


def test_nvml_pid_is_the_outermost_namespace_pid(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nPid:\t57\nNSpid:\t812345\t57\n")  # host PID first, container PID last
    assert nvml_visible_pid(status) == 812345
    status.write_text("Name:\tpython\nPid:\t57\n")  # kernels before 4.1 have no NSpid
    assert nvml_visible_pid(status) == os.getpid()
    assert nvml_visible_pid(tmp_path / "missing") == os.getpid()
