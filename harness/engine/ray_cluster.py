"""Connecting to a Ray cluster (``--ray auto|local|HOST:PORT``) and sizing a trial's share of it."""

from __future__ import annotations

import os
import socket

import psutil
import ray

from harness import interrupt
from harness.config import HarnessError, ResourcesConfig, SpecError
from harness.engine.watchdog import wait_watchdogs, watch_cluster


class ClusterUnreachable(HarnessError):
    """``--ray ADDRESS`` names no Ray cluster this machine can join."""


def connect(address: str) -> bool:
    """Join (or start, for ``local``) the Ray cluster; True when this call started the connection.

    A HOST:PORT that does not answer is refused at once: ``ray.init`` would retry it for minutes. A ``local``
    cluster gets a watchdog (:mod:`.watchdog`) that takes it down with this process, however this process dies.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():  # a process already connected (a test, a notebook) keeps its connection
        return False
    if address not in ("local", "auto"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as error:
            raise ClusterUnreachable(f"--ray {address}: no Ray cluster answers there ({error})") from None
    before = {child.pid for child in psutil.Process().children()}
    try:
        # "local" is a new cluster here: address=None would join a cluster found on this machine, even a dead one
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterUnreachable(
            f"--ray {address}: cannot join the Ray cluster ({str(error).splitlines()[0]})"
        ) from None
    finally:
        interrupt.reclaim()  # ray.init's SIGTERM handler dumps a stack and aborts: SIGTERM must end as Ctrl-C does
    if address == "local":
        watch_cluster(before)
    return True


def disconnect() -> None:
    """Leave the cluster (shut it down when this process started it) and see its watchdog go too."""
    ray.shutdown()
    wait_watchdogs()


def cancel_all(refs: list[ray.ObjectRef], wait_s: float = 30) -> None:
    """Cancel the tasks and give them ``wait_s`` to end (each ends its own run or trial as an interruption)."""
    for ref in refs:
        ray.cancel(ref)
    ray.wait(refs, num_returns=len(refs), timeout=wait_s)


def trial_resources(resources: ResourcesConfig, address: str, where: str) -> dict[str, float]:
    """``num_gpus``/``num_cpus`` for one trial's task; one GPU by default when the cluster has GPUs.

    A trial must fit on one node: asking for more than the largest node has is refused before anything runs.
    """
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    largest = {kind: max((node.get(kind, 0.0) for node in nodes), default=0.0) for kind in ("GPU", "CPU")}
    gpus = resources.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if largest["GPU"] > 0 else 0.0
    for key, kind, wanted in [("gpus_per_trial", "GPU", gpus), ("cpus_per_trial", "CPU", resources.cpus_per_trial)]:
        if wanted > largest[kind]:
            raise SpecError(
                f"{where}: resources.{key}={wanted:g} but no node of the Ray cluster at {address} "
                f"has more than {largest[kind]:g} {kind}s"
            )
    return {"num_gpus": gpus, "num_cpus": resources.cpus_per_trial}
