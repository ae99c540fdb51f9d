"""The blocks a report is made of. The sections produce them; the Markdown and PDF writers lay them out.

Inline markup inside any text is limited to **bold** and `code`, which both writers understand.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
