"""The blocks a report is made of, and how numbers read inside them. The sections produce blocks; the Markdown
and PDF writers lay them out.

Inline markup inside any text is limited to **bold** and `code`, which both writers understand. Numbers read the
same in every table and sentence, '–' wherever there is no value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MISSING = "–"


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells marked best
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    file: str  # PNG name, relative to the report folder
    title: str
    caption: str
    section: str  # the key of the section that shows it: "health", "curves", "cost", "utilisation", "tuning"


@dataclass
class Image:
    figure: Figure


Block = Heading | Para | Bullets | Table | Image


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value:,.{digits}f}"


def fmt_count(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{int(round(value)):,}"


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return MISSING
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {sec:02d} s" if hours else f"{minutes} min {sec:02d} s"
