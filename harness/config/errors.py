"""Bad input in words: the one-line :class:`HarnessError` family (:class:`SpecError` for a spec or option) and how a
validation error becomes one."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

VALUE_CHARS = 200  # an offending value is echoed up to this many characters


class HarnessError(Exception):
    """What the user must fix or wait for before a command can run; the message is one line for the user, and the
    command exits 2 with it (``harness.cli``)."""


class SpecError(HarnessError, ValueError):
    """A study spec or CLI input that cannot be used."""


def shorten(value: Any) -> str:
    """``repr(value)``, cut to :data:`VALUE_CHARS` characters (a 15 MB string is not one line)."""
    text = repr(value)
    return text if len(text) <= VALUE_CHARS else f"{text[:VALUE_CHARS]}... ({len(text):,} characters)"


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys at ``loc`` (for 'did you mean')."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = next((a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


UNION_TAGS = frozenset({"list", "sequential"})  # the tags of ``matrix.seeds``' two forms: in an error's path, no key


def describe_error(error: ValidationError, model: type[BaseModel], where: str) -> str:
    """One line for the user: where, which key, what is wrong (with a 'did you mean' for unknown keys)."""
    first = error.errors()[0]
    loc = tuple(part for part in first["loc"] if part not in UNION_TAGS)
    key = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(str(loc[-1]), _field_names(model, loc), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"{where}: unknown key '{key}'{suggestion}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"{where}: missing key '{key}'"
    if not loc:  # a check across keys: its message names them
        return f"{where}: {message}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" = {shorten(value)}"
    return f"{where}: {key}{shown}: {message}"
