"""What a trial carries from step to step (``TrainState``), and the checkpoints it resumes from.

``TrainState.state_dict`` is the one description of that state: a checkpoint is exactly it plus a
fingerprint of the config, and a resume is exactly ``load_state_dict`` of it, bit-for-bit on CPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.config import SpecError
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


class Checkpointer:
    """Atomic checkpoints of a ``TrainState.state_dict``, tagged with the config they belong to."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path, self.fingerprint = path, fingerprint

    def save(self, payload: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"fingerprint": self.fingerprint, **payload}, partial)
        os.replace(partial, self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise SpecError(
                f"{self.path}: unreadable checkpoint ({type(error).__name__}); delete it to restart the trial"
            ) from None
        if payload.get("fingerprint") != self.fingerprint:
            raise SpecError(
                f"{self.path}: checkpoint was written for a different config; delete it to restart the trial"
            )
        return payload

    def restore(self, state: TrainState) -> bool:
        """Load the last checkpoint into ``state``; False when there is none (a fresh start)."""
        saved = self.load()
        if saved is not None:
            state.load_state_dict(saved)
        return saved is not None


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
