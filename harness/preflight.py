"""Everything about a study's cells that is knowable before training, checked before anything is written.

Each problem is one :class:`~harness.config.SpecError` line naming the key, the file or the option: a CUDA device
or a data folder this machine lacks, data files and splits too short for the batch, a model that cannot be built or
does not fit in memory, a token budget far beyond the data, strings longer than MLflow keeps, a checkpoint folder
without room for one checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import psutil
import torch
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_EXPERIMENT_NAME_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
)

from harness.checkpoint import cell_checkpointer, check_room, checkpoint_bytes, human_bytes
from harness.config import DATA_ENV, SpecError, StudySpec, TrialConfig, shorten
from harness.data import Corpus, DataError, read_corpus, split_files
from harness.fingerprint import run_params
from harness.matrix import Cell
from harness.step import resolve_device
from harness.trainer import total_steps
from models import build_model

MAX_EPOCHS = 1000  # a token budget beyond this many passes over the train split is refused as a likely typo


def corpus_key(cell: Cell) -> str:
    return cell.config.data.model_dump_json()


def preflight(
    spec: StudySpec, cells: list[Cell], checkpoint_dir: Path, where: str = "spec", *, supersede: bool = False
) -> dict[str, Corpus]:
    """The corpora the cells read (by :func:`corpus_key`), once every cell has passed every check.

    A leftover checkpoint of what a cell no longer computes is refused, unless ``supersede`` (then a changed cell's
    checkpoint goes with its old run: ``harness.study.driver.Study.prepare``).
    """
    check_strings(spec, where)
    check_host((cell.config for cell in cells), where)
    corpora: dict[str, Corpus] = {}
    parameters: dict[str, int] = {}  # cell key -> parameter count (the meta build is done once per cell)
    for cell in cells:
        if corpus_key(cell) not in corpora:
            corpora[corpus_key(cell)] = read_corpus(cell.config.data)  # cached once the study may go on
        corpus = corpora[corpus_key(cell)]
        check_splits(cell.config, corpus)
        check_budget(cell.config, corpus, f"{where}: {cell.key}")
        check_params(cell, corpus, where)
        parameters[cell.key] = count_parameters(cell, corpus, where)
        check_memory(cell.config, parameters[cell.key], f"{where}: {cell.key}")
        if not supersede:
            cell_checkpointer(checkpoint_dir, spec, cell, corpus).load()  # CheckpointUnusable: another config's
    check_checkpoint_room(spec, cells, corpora, parameters, checkpoint_dir)
    return corpora


def check_host(configs: Iterable[TrialConfig], where: str) -> None:
    """This machine has what the configs ask for: a CUDA device for ``train.device: cuda``, the data folder.

    Not part of loading a spec: listing cells and reporting work on a machine without either (a login node)."""
    for config in configs:
        try:
            resolve_device(config.train.device)
        except SpecError as error:
            raise SpecError(f"{where}: {config.variant}: {error} on this machine (use auto or cpu)") from None
        folder = config.data.root() / config.data.name
        if not folder.is_dir():
            source = f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "data.path"
            raise DataError(
                f"{where}: data folder '{folder}' does not exist (set {source}, or run 'harness data download')"
            )


def check_splits(config: TrialConfig, corpus: Corpus) -> None:
    """Every split must give each row of its batch at least two tokens (an input and its target)."""
    files = split_files(config.data)
    batch = {"train": ("train.batch_size", config.train.batch_size)}
    for split in ("train", "validation", "test"):
        key, rows = batch.get(split, ("train.eval_batch_size", config.train.eval_batch_size))
        tokens = corpus.split(split).numel()
        if tokens == 0:
            raise SpecError(f"{files[split]}: the {split} split is empty")
        if tokens < 2 * rows:
            raise SpecError(
                f"{files[split]}: the {split} split has {tokens:,} tokens, too few for {key} = {rows:,} "
                f"(each row needs at least 2)"
            )


def check_budget(config: TrialConfig, corpus: Corpus, where: str) -> None:
    tokens = config.budget.tokens
    epochs = tokens / corpus.train.numel() if tokens is not None else 0.0
    if epochs > MAX_EPOCHS:
        raise SpecError(
            f"{where}: budget.tokens = {tokens:,} is {epochs:,.0f} epochs of the {corpus.train.numel():,}-token "
            f"train split; more than {MAX_EPOCHS:,} is refused (ask for it with budget.epochs)"
        )


def count_parameters(cell: Cell, corpus: Corpus, where: str) -> int:
    """The cell's model built on the meta device (shapes only: no memory, no initialisation cost)."""
    try:
        with torch.device("meta"):
            model = build_model(cell.config.model, cell.config.moe, corpus.vocab_size)
    except (RuntimeError, OverflowError, MemoryError) as error:  # sizes beyond what a tensor can hold
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise SpecError(
            f"{where}: {cell.key}: the model cannot be built ({first_line}); check model.*, moe.*"
        ) from None
    return sum(p.numel() for p in model.parameters())


def check_memory(config: TrialConfig, n_parameters: int, where: str) -> None:
    """At least what training holds, its checkpoint's content (weights, optimiser state) and the gradients, must fit
    in the memory the device has free."""
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        available, what = torch.cuda.mem_get_info(device)[0], f"free on {torch.cuda.get_device_name(device)}"
    else:
        available, what = psutil.virtual_memory().available, "of memory available on this machine"
    needed = checkpoint_bytes(n_parameters, config.optim.name, config.optim.momentum) + 4 * n_parameters
    if needed > available:
        raise SpecError(
            f"{where}: {n_parameters:,} parameters need at least {human_bytes(needed)} for weights, gradients and "
            f"{config.optim.name} state, more than the {human_bytes(available)} {what} (check model.*, moe.*)"
        )


def check_checkpoint_room(
    spec: StudySpec,
    cells: list[Cell],
    corpora: dict[str, Corpus],
    parameters: dict[str, int],
    checkpoint_dir: Path,
) -> None:
    """The checkpoint folder must have room for the largest cell's checkpoint twice (a save writes the new file
    beside the last one), less what that cell's checkpoint already takes. Cells run one at a time here; on a
    Ray cluster the cells running at once each need their room (not checked: the folder is the nodes')."""
    largest, room = None, 0
    for cell in cells:
        corpus = corpora[corpus_key(cell)]
        config = cell.config
        if not writes_checkpoints(config, corpus):
            continue
        n_parameters = parameters[cell.key]
        path = cell_checkpointer(checkpoint_dir, spec, cell, corpus).path
        needed = 2 * checkpoint_bytes(n_parameters, config.optim.name, config.optim.momentum)
        needed -= path.stat().st_size if path.is_file() else 0
        if needed > room:
            largest, room = cell, needed
    if largest is not None:
        check_room(checkpoint_dir / spec.name, room, largest.key)


def check_strings(spec: StudySpec, where: str) -> None:
    """What MLflow would refuse mid-study: the description (the study run's tag), the name (the experiment's)."""
    if len(spec.description) > MAX_TAG_VAL_LENGTH:
        raise SpecError(
            f"{where}: description has {len(spec.description):,} characters; MLflow keeps at most "
            f"{MAX_TAG_VAL_LENGTH:,} (the study run's description)"
        )
    if len(spec.name) > MAX_EXPERIMENT_NAME_LENGTH:
        raise SpecError(
            f"{where}: name has {len(spec.name):,} characters; MLflow keeps at most {MAX_EXPERIMENT_NAME_LENGTH}"
        )


def check_params(cell: Cell, corpus: Corpus, where: str) -> None:
    """The cell's key (a tag) and every config value (a param) must fit MLflow's limits."""
    if len(cell.key) > MAX_TAG_VAL_LENGTH:
        raise SpecError(f"{where}: cell {shorten(cell.key)}: the key is longer than MLflow's {MAX_TAG_VAL_LENGTH:,}")
    for key, value in run_params(cell.config, corpus).items():
        if len(key) > MAX_ENTITY_KEY_LENGTH or len(value) > MAX_PARAM_VAL_LENGTH:
            raise SpecError(
                f"{where}: {cell.key}: {shorten(key)} = {shorten(value)}: {len(value):,} characters; MLflow "
                f"params hold at most {MAX_PARAM_VAL_LENGTH:,}"
            )


def writes_checkpoints(config: TrialConfig, corpus: Corpus) -> bool:
    """Whether the cell writes a resumable checkpoint (the first comes at ``budget.checkpoint_every_steps``)."""
    n_steps = total_steps(config, corpus.train.numel() // config.train.batch_size)
    return n_steps > config.budget.checkpoint_every_steps
