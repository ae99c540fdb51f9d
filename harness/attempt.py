"""Attempt tags: the newest attempt at a cell owns its MLflow run; an older, lost one stops writing.

Ray retries a task it declared lost (its node stopped answering) even if the old process still
runs. Each attempt writes its own token in the run's ``harness.attempt`` tag when it starts; the
metric sink compares the tag with its token at log steps, at most every ``check_every_s`` seconds
(one ``get_run`` call), and stops the trial once another attempt has taken the run; a trial run checks again
before it ends its run (``TrialRun.finish`` / ``fail``), so a lost attempt never ends the newer one's run.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from mlflow.tracking import MlflowClient

from harness.tags import ATTEMPT
from harness.tracking import AttemptSuperseded, MlflowSink

__all__ = ["AttemptSink", "AttemptSuperseded", "new_attempt"]


def new_attempt(client: MlflowClient, run_id: str) -> str:
    """Mark ``run_id`` as written by a new attempt (this process) and return its token."""
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    client.set_tag(run_id, ATTEMPT, token)
    return token


class AttemptSink(MlflowSink):
    """The trial's metric sink, which raises :class:`AttemptSuperseded` once the run's attempt is not its own."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        logged: dict[str, int] | None,
        attempt: str,
        check_every_s: float = 10.0,
    ) -> None:
        super().__init__(client, run_id, logged)
        self.attempt, self.check_every_s = attempt, check_every_s
        self.checked = time.monotonic()

    def check_owner(self) -> None:
        """:class:`AttemptSuperseded` unless the run's attempt tag is still this attempt's (one ``get_run``)."""
        self.checked = time.monotonic()
        current = self.client.get_run(self.run_id).data.tags.get(ATTEMPT)
        if current != self.attempt:
            raise AttemptSuperseded(f"run {self.run_id} now belongs to attempt {current}, not {self.attempt}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if time.monotonic() - self.checked >= self.check_every_s:
            self.check_owner()
        super().log_metrics(metrics, step)
