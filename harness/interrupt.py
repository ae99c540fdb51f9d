"""Ctrl-C and SIGTERM as a flag the harness checks at safe points, never an exception raised mid-call.

A handler that raises can land anywhere, inside a garbage-collection callback too, where Python
prints "Exception ignored" and swallows it: the signal would be lost. So the handler only records
the signal; the trainer calls :func:`check` at each step and the study and tuning loops between
trials, and :class:`Interrupted` unwinds from there: the run is marked KILLED, the checkpoint
stays, and the command exits ``128 + signal``. A second signal while the first is
being handled raises at once, for a user who does not want to wait.
"""

from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals seen since install(), in order


class Interrupted(KeyboardInterrupt):
    """The harness was asked to stop (SIGINT/SIGTERM): not the trial's fault, so its run is KILLED."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _record(signum: int, _frame: object) -> None:
    _received.append(signum)
    if len(_received) > 1:
        raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to the flag (main thread only, as Python requires)."""
    _received.clear()
    reclaim()


def reclaim() -> None:
    """Route SIGINT and SIGTERM to the flag again, keeping any signal already received.

    For after a library took them over: ``ray.init`` installs a SIGTERM handler of its own in the driver, at the C
    level (it prints a native stack dump and aborts), where SIGTERM must stop the harness as Ctrl-C does.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            signal.signal(signum, _record)


def requested() -> int | None:
    """The first signal received since :func:`install`, or None."""
    return _received[0] if _received else None


def check() -> None:
    """Raise :class:`Interrupted` if a stop was requested (call at a safe point)."""
    if (signum := requested()) is not None:
        raise Interrupted(signum)
