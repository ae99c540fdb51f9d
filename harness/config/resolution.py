"""From a study spec to its trial configs: base, variant preset, overrides and sweep point merged and validated,
and the order its variants run in (each after the variants it starts from, ``init.source``)."""

from __future__ import annotations

import copy
import itertools
from graphlib import CycleError, TopologicalSorter
from typing import Any, NamedTuple

from pydantic import ValidationError

from harness.config.errors import SpecError, describe_error
from harness.config.schema import VARIANT_PRESETS, StudySpec, TrialConfig
from models.config import upcycle_mismatch


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``tree`` with ``a.b.c`` set to ``value``."""
    head, *rest = dotted.split(".")
    out = dict(tree)
    out[head] = set_dotted(dict(out.get(head) or {}), ".".join(rest), value) if rest else value
    return out


def resolve_trial(spec: StudySpec, variant: str, seed: int, assignment: dict[str, Any] | None = None) -> TrialConfig:
    """base -> variant preset -> per-variant overrides -> sweep assignment -> variant/preset/seed."""
    preset = spec.preset(variant)
    tree = deep_merge(spec.base, VARIANT_PRESETS[preset])
    tree = deep_merge(tree, spec.overrides.get(variant, {}))
    for key, value in (assignment or {}).items():
        tree = set_dotted(tree, key, value)
    tree.update(variant=variant, preset=preset, seed=seed)
    return TrialConfig.model_validate(tree)


class ResolvedTrial(NamedTuple):
    variant: str
    seed: int
    assignment: dict[str, Any]
    config: TrialConfig


def resolve_matrix(spec: StudySpec, where: str = "spec") -> list[ResolvedTrial]:
    """Every trial of the matrix, in matrix order (variant, sweep point, seed)."""
    sweep_keys = sorted(spec.matrix.sweep)
    points = [
        dict(zip(sweep_keys, values, strict=True))
        for values in itertools.product(*(spec.matrix.sweep[k] for k in sweep_keys))
    ]
    trials = []
    for variant in spec.matrix.variants:
        for assignment in points:
            for seed in spec.matrix.all_seeds():
                try:
                    config = resolve_trial(spec, variant, seed, assignment)
                except ValidationError as error:
                    raise SpecError(f"{describe_error(error, TrialConfig, where)} (variant {variant})") from None
                except (TypeError, AttributeError):  # set_dotted into a value that is no mapping
                    raise SpecError(f"{where}: matrix.sweep key in {sweep_keys} is not a config value") from None
                trials.append(ResolvedTrial(variant, seed, assignment, config))
    return trials


def source_order(trials: list[ResolvedTrial], where: str) -> list[str]:
    """The trials' variants in matrix order, except that the variants one starts from (``init.source``) move ahead
    of it when the matrix lists them later.

    A source that is not a variant of the matrix, a cycle, or a source whose model cannot be upcycled into the
    dependent's is a one-line ``SpecError``."""
    variants = list(dict.fromkeys(t.variant for t in trials))
    sources: dict[str, set[str]] = {v: set() for v in variants}
    for trial in trials:
        source = trial.config.init.source
        if source is not None and source not in variants:
            raise SpecError(f"{where}: {trial.variant}: init.source = {source!r} is not a variant of the matrix")
        sources[trial.variant] |= {source} if source is not None else set()
    try:
        TopologicalSorter(sources).prepare()
    except CycleError as error:
        raise SpecError(f"{where}: init.source forms a cycle: {' -> '.join(reversed(error.args[1]))}") from None
    check_upcycling(trials, where)
    return sources_first(variants, sources)


def sources_first(variants: list[str], sources: dict[str, set[str]]) -> list[str]:
    """``variants`` in their order, each preceded by those of its ``sources`` not placed yet (an acyclic graph)."""
    order: list[str] = []

    def place(variant: str) -> None:
        if variant not in order:
            for source in sorted(sources[variant], key=variants.index):
                place(source)
            order.append(variant)

    for variant in variants:
        place(variant)
    return order


def check_upcycling(trials: list[ResolvedTrial], where: str) -> None:
    """Each cell with an ``init.source`` must be able to start from its source cell's model (same seed and sweep
    point); the sources are variants of the matrix (checked before)."""
    by_cell = {(t.variant, t.seed, str(t.assignment)): t.config for t in trials}
    for trial in (t for t in trials if t.config.init.source is not None):
        source = by_cell[(trial.config.init.source, trial.seed, str(trial.assignment))]
        problem = upcycle_mismatch(source.model, source.moe, trial.config.model, trial.config.moe)
        if problem:
            raise SpecError(f"{where}: {trial.variant} cannot start from {trial.config.init.source}: {problem}")
