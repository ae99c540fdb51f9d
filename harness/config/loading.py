"""Reading a study spec: YAML (a duplicate key is an error), then every check that needs only the spec itself.

Nothing here looks at the machine (a CUDA device, the data folder): listing cells and reporting work anywhere, and
``harness.preflight`` checks the host before a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from harness.config.errors import SpecError, describe_error, shorten
from harness.config.resolution import resolve_matrix, resolve_trial, source_order
from harness.config.schema import PRESET_FFN, StudySpec, TrialConfig


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not "the last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shorten(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; SpecError (one line) for a missing, unreadable or malformed file."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise SpecError(f"{path}: no such study spec") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a study spec") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (a study spec is YAML)") from None
    except OSError as error:
        raise SpecError(f"{path}: unreadable ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{at}: {problem}") from None


def load_spec(path: str | Path) -> StudySpec:
    """Parse and fully validate a study spec, including every trial it expands to."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a study spec must be a YAML mapping, got {type(raw).__name__}")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(describe_error(error, StudySpec, str(path))) from None
    check_spec(spec, str(path))
    if spec.tune is not None:
        check_tune(spec, str(path))
    return spec


def check_spec(spec: StudySpec, where: str) -> None:
    """Every trial config the matrix expands to must be valid, and its ``init.source`` usable."""
    source_order(resolve_matrix(spec, where=where), where)


def check_tune(spec: StudySpec, where: str) -> None:
    """Every edge of the search space must give a valid trial config for the tuned variant."""
    tune = spec.tune
    assert tune is not None
    if tune.variant in PRESET_FFN:
        raise SpecError(f"{where}: tune.variant = {tune.variant!r} has no MoE layer to tune")
    edges = {key: param.extremes() for key, param in tune.space.items()}
    candidates = [{key: value} for key, values in edges.items() for value in values]
    candidates.append({key: values[0] for key, values in edges.items()})
    candidates.append({key: values[-1] for key, values in edges.items()})
    for assignment in candidates:
        try:
            resolve_trial(spec, tune.variant, tune.seeds[0], assignment)
        except ValidationError as error:
            shown = ", ".join(f"{k}={v!r}" for k, v in assignment.items())
            raise SpecError(f"{describe_error(error, TrialConfig, where)} (tune.space at {shown})") from None
        except (AttributeError, TypeError):
            raise SpecError(f"{where}: tune.space key in {sorted(assignment)} is not a config value") from None
