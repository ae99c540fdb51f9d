"""What a trial carries from step to step (``TrainState``), and the checkpoints it resumes from.

``TrainState.state_dict`` is the one description of that state: a checkpoint is exactly it plus a
fingerprint of the config, and a resume is exactly ``load_state_dict`` of it, bit-for-bit on CPU.

A checkpoint that cannot be written (a full disk) fails the trial with :class:`CheckpointWriteError`, whose
one line names the path, and leaves no partial file; :func:`checkpoint_bytes` and :func:`check_room` let a
caller refuse a folder without room for one before training starts.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.config import HarnessError, SpecError, StudySpec
from harness.data import Corpus
from harness.fingerprint import identity
from harness.matrix import Cell
from models import LanguageModel


@dataclass
class TrainState:
    model: LanguageModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    train_counts: Tensor  # (layers, experts) routed slots over every closed logging window
    step: int = 0
    tokens: int = 0
    train_time: float = 0.0  # seconds of training proper: evaluation and checkpointing excluded
    best_val: float = math.inf
    history: list[dict[str, Any]] = field(default_factory=list)  # step, tokens, layer, expert, share per window
    recurrent: Any = None  # the state truncated BPTT carries to the next window (LSTM), else None

    def state_dict(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if cuda else {}),
            "step": self.step,
            "tokens": self.tokens,
            "train_time": self.train_time,
            "best_val": self.best_val,
            "train_counts": self.train_counts.cpu(),
            "history": self.history,
            "state": [s.cpu() for s in self.recurrent] if self.recurrent is not None else [],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if self.device.type == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        self.step, self.tokens, self.train_time = saved["step"], saved["tokens"], saved["train_time"]
        self.best_val = saved["best_val"]
        self.train_counts = saved["train_counts"].to(self.device)
        self.history = saved["history"]
        self.recurrent = tuple(s.to(self.device) for s in saved["state"]) if saved["state"] else None


class CheckpointUnusable(HarnessError):
    """A checkpoint on disk that cannot resume its cell: unreadable, or written for another config."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written: ``str`` is one line, "<reason> writing <path>"."""

    @classmethod
    def writing(cls, path: Path, cause: OSError) -> CheckpointWriteError:
        error = cls(f"{(cause.strerror or str(cause)).lower()} writing {path}")
        error.errno = cause.errno  # not in the args: with it there, str() would read "[Errno 28] ..."
        return error


class Checkpointer:
    """Atomic checkpoints of a ``TrainState.state_dict``, tagged with the config they belong to.

    Written to ``<cell>.<host>.<pid>.tmp`` beside the checkpoint, then renamed over it. A failed write removes
    its temporary file; one left by a process killed mid-save is removed by the next save into the folder on
    the same host, once that process is gone.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path, self.fingerprint = path, fingerprint

    def save(self, payload: dict[str, Any]) -> None:
        """Write the checkpoint; :class:`CheckpointWriteError` when the folder cannot take it (nothing left over)."""
        # Serialised in memory first: torch.save writing to a full disk fails in its zip writer with a message
        # that names neither the disk nor the file; plain file writes raise the OS error itself.
        buffer = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, **payload}, buffer)
        partial = self.path.with_name(f"{self.path.stem}.{_HOST}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.path.parent)
            write_file(partial, buffer.getbuffer())
            os.replace(partial, self.path)
        except OSError as error:
            raise CheckpointWriteError.writing(self.path, error) from error
        finally:  # gone after the rename; a failed write's partial file must not stay and fill the disk
            with contextlib.suppress(OSError):  # not in the way of the error that brought us here
                partial.unlink(missing_ok=True)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointUnusable(
                f"{self.path}: unreadable checkpoint ({type(error).__name__}); delete it to restart the trial"
            ) from None
        if payload.get("fingerprint") != self.fingerprint:
            raise CheckpointUnusable(
                f"{self.path}: checkpoint was written for a different config; delete it to restart the trial "
                f"(or rerun with --supersede: a changed cell starts as a new run)"
            )
        return payload

    def restore(self, state: TrainState) -> bool:
        """Load the last checkpoint into ``state``; False when there is none (a fresh start)."""
        saved = self.load()
        if saved is not None:
            state.load_state_dict(saved)
        return saved is not None


def cell_checkpointer(checkpoint_dir: Path, spec: StudySpec, cell: Cell, corpus: Corpus) -> Checkpointer:
    """A study cell's resumable checkpoint, valid only for what the cell computes (its identity)."""
    return Checkpointer(checkpoint_dir / spec.name / f"{cell.name}.pt", identity(cell.config, corpus))


class CheckpointPolicy:
    """When to checkpoint: at the first logging step at or past each multiple of ``every``, never the last.

    Logging steps, because the window accumulators are empty there; after the window's metrics are in
    the sink's store (``sync``), so a resumed trial repeats nothing and loses nothing.
    """

    def __init__(self, checkpointer: Checkpointer | None, every: int, step: int) -> None:
        self.checkpointer, self.every = checkpointer, every
        self.next_step = (step // every + 1) * every

    def maybe_save(self, state: TrainState, logged: bool, last: bool, sync: Callable[[], None]) -> None:
        if self.checkpointer is None or not logged or last or state.step < self.next_step:
            return
        self.next_step = (state.step // self.every + 1) * self.every
        sync()
        self.checkpointer.save(state.state_dict())


_HOST = socket.gethostname()


def write_file(path: Path, data: memoryview) -> None:
    """``data`` into ``path``, on disk before it returns: a full disk raises ``OSError`` (ENOSPC) here, not later."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # some file systems report a full disk only when the data is written back


def remove_stale_partials(folder: Path) -> None:
    """Remove the temporary checkpoint files in ``folder`` that processes of this host which are gone left behind
    (killed mid-save: nothing could clean up). Other hosts' files stay: whether their writer lives is unknown."""
    for partial in stale_partials(folder):
        partial.unlink(missing_ok=True)


def stale_partials(folder: Path) -> list[Path]:
    """The temporary checkpoint files in ``folder`` whose writer, a process of this host, is gone."""
    found = []
    for partial in folder.glob("*.tmp"):
        writer, _, pid = partial.name.removesuffix(".tmp").rpartition(".")
        if writer.endswith(f".{_HOST}") and pid.isdigit() and not _alive(int(pid)):
            found.append(partial)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}  # state tensors per parameter (SGD: its momentum buffer, when it has one)
CHECKPOINT_MARGIN = 1 << 20  # RNG states, counters, the fingerprint, the zip archive's per-tensor records


def checkpoint_bytes(parameters: int, optimizer: str, momentum: float = 0.0) -> int:
    """About how many bytes one checkpoint of a model with ``parameters`` parameters takes, a little over.

    fp32 weights plus the optimiser's state (``optimizer``: ``OptimConfig.name``; AdamW keeps 2 values per
    parameter, SGD 1 with ``momentum``, else none), 4 bytes each, plus 1% and :data:`CHECKPOINT_MARGIN`. An
    upper bound when parameters are frozen (they have no optimiser state). Not counted: the routing history,
    about 40 bytes per (layer, expert) per logging window, which only a run with very many windows notices.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZER_STATES)}")
    states = OPTIMIZER_STATES[optimizer] if optimizer != "sgd" or momentum > 0 else 0
    payload = 4 * parameters * (1 + states)
    return payload + payload // 100 + CHECKPOINT_MARGIN


def check_room(folder: Path, needed_bytes: int, what: str, option: str = "--checkpoint-dir") -> None:
    """SpecError unless ``folder`` (or, before it exists, its nearest existing ancestor) has ``needed_bytes`` free.

    For the check before a study's first checkpoint. ``folder``: where the checkpoints go (a checkpointer's
    ``path.parent``). ``needed_bytes``: from :func:`checkpoint_bytes`, twice per cell that checkpoints at once,
    since each save writes the new file beside the last one before replacing it (once for a cell that resumes
    from a checkpoint already there). ``what``: names the cell(s) in the message. Partial files left by killed
    writers count as free: the first save removes them. Nothing is written.
    """
    folder = folder.resolve()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
        if existing == folder and folder.is_dir():
            free += sum(partial.stat().st_size for partial in stale_partials(folder))
    except OSError as error:
        raise SpecError(f"{option} {folder}: cannot read its free space ({error.strerror or error})") from None
    if free < needed_bytes:
        needs = f"checkpointing {what} needs about {human_bytes(needed_bytes)}"
        raise SpecError(f"{option} {folder}: {human_bytes(free)} free, {needs}")


def human_bytes(count: int) -> str:
    """``count`` bytes for a message: "512 B", "1.9 MiB", "3.2 GiB"."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    size, index = float(count), 0
    while size >= 1024 and index < len(units) - 1:
        size, index = size / 1024, index + 1
    return f"{count} B" if index == 0 else f"{size:.1f} {units[index]}"
