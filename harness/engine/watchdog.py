"""A watchdog that takes a ``--ray local`` cluster down with its driver, however the driver dies.

Ray ties the head's processes to the driver that started them (the kernel kills ``gcs_server``,
``raylet``, the dashboard and monitors with it), but not the raylet's children: after a SIGKILLed
driver, the dashboard and runtime-env agents see their raylet gone, then wait about a minute on a
report to the dead GCS before exiting, and the cell tasks keep training and logging until their
core worker notices the lost raylet. No Ray option shortens that wait.

:func:`watch_cluster` (called by :func:`harness.engine.ray_cluster.connect` after it started the
cluster) starts this file as a small process of its own session. While the driver lives, it keeps
the pids of the cluster's processes: the driver's children that ``ray.init`` started and all their
descendants (refreshed, since a dead raylet's children are reparented). When the driver dies (its
parent changes), it SIGKILLs those still alive (same pid and start time: never a reused pid), then
exits. When the cluster ends first (``ray.shutdown()``), it exits without killing anything. A driver
that dies inside ``ray.init``, before its watchdog starts, is not covered.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

TICK_S = 0.2

_started: list[subprocess.Popen] = []  # kept (and reaped) here: a dropped Popen warns while the watchdog runs


def cluster_roots(before: set[int]) -> list[int]:
    """The driver's children that are not in ``before`` and run Ray's own programs: the cluster ``ray.init`` started."""
    import ray  # the driver's, already imported; this file alone runs without it

    ray_dir = str(Path(ray.__file__).parent) + os.sep
    roots = []
    for child in psutil.Process().children():
        try:
            if child.pid not in before and any(arg.startswith(ray_dir) for arg in child.cmdline()):
                roots.append(child.pid)
        except psutil.Error:  # ended already
            continue
    return roots


def family(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants (none when it ended)."""
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def watch_cluster(before: set[int]) -> None:
    """Start the watchdog for the cluster this process just started (``before``: its children before ``ray.init``)."""
    _started[:] = [process for process in _started if process.poll() is None]
    cluster = [process for root in cluster_roots(before) for process in family(root)]
    if not cluster:
        return
    command = [sys.executable, "-I", __file__, str(os.getpid())]
    command += [f"{process.pid}:{process.create_time()!r}" for process in cluster]
    devnull = subprocess.DEVNULL
    _started.append(subprocess.Popen(command, stdin=devnull, stdout=devnull, stderr=devnull, start_new_session=True))


def wait_watchdogs(timeout_s: float = 5.0) -> None:
    """After ``ray.shutdown()``: give this process's watchdogs ``timeout_s`` to see the cluster gone and exit."""
    deadline = time.monotonic() + timeout_s
    for process in _started:
        try:
            process.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:  # something of the cluster lingers: the watchdog stays for it
            continue
    _started[:] = [process for process in _started if process.returncode is None]


def running(process: psutil.Process) -> bool:
    """Still the same process (psutil compares start times: a reused pid is another process), not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def refresh(known: list[psutil.Process]) -> list[psutil.Process]:
    """``known``'s live processes and all their descendants, from one scan of the process table."""
    children: dict[int, list[psutil.Process]] = {}
    for process in psutil.process_iter(["ppid"]):
        children.setdefault(process.info["ppid"], []).append(process)
    found = {process.pid: process for process in known if running(process)}
    queue = list(found)
    while queue:
        for child in children.get(queue.pop(), []):
            if child.pid not in found:
                found[child.pid] = child
                queue.append(child.pid)
    return list(found.values())


def adopt(listed: list[str]) -> list[psutil.Process]:
    """Those of the driver's ``pid:start_time`` that still run (the start time as the driver read it, give or take
    a clock adjustment)."""
    known = []
    for item in listed:
        pid, _, started = item.partition(":")
        try:
            process = psutil.Process(int(pid))
            if abs(process.create_time() - float(started)) < 0.5 and running(process):
                known.append(process)
        except psutil.Error:
            continue
    return known


def watch(driver: int, listed: list[str]) -> None:
    """Track the cluster while ``driver`` (this process's parent) lives; kill what is left of it once it died."""
    known = adopt(listed)
    while os.getppid() == driver:  # a dead process's children are reparented at once, even before it is reaped
        known = refresh(known)
        if not known:  # the cluster was shut down: nothing left to watch
            return
        time.sleep(TICK_S)
    for process in known:
        try:
            process.kill()  # psutil refuses a pid that now names another process
        except psutil.Error:
            continue


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2:])
