"""What the report says, section by section: ``build_document`` lists the sections in order.

A section is a function returning a list of blocks (``harness.report.blocks``); adding one is a
function in its own module and one line here. Figures are made first and carry the key of the
section that shows them, so a section can pick its own.
"""

from __future__ import annotations

from datetime import datetime

import optuna

from harness.report.blocks import Block, Figure, Heading, Image
from harness.report.claims import equivalence_section, matched_section
from harness.report.comparison import main_comparison, significance_section
from harness.report.gather import StudyData
from harness.report.health import health_section
from harness.report.overview import failures, header
from harness.report.tuning import tuning_only_note, tuning_summary
from harness.report.verdict import verdict_section


def figure_section(figures: list[Figure], key: str, title: str | None = None) -> list[Block]:
    """The figures made for section ``key``, under ``title`` when given; nothing when there are none."""
    chosen: list[Block] = [Image(f) for f in figures if f.section == key]
    return [Heading(title), *chosen] if chosen and title else chosen


def build_document(
    data: StudyData, figures: list[Figure], generated: datetime, tuning: optuna.Study | None = None
) -> list[Block]:
    if data.tuning_only:  # tuning trials differ in hyperparameters: no per-variant comparison
        return [
            *header(data, generated),
            tuning_only_note(data),
            *tuning_summary(data, tuning),
            *figure_section(figures, "tuning"),
            *failures(data),
        ]
    return [
        *header(data, generated),
        *health_section(data, figures),  # first: whether each trial trained decides what the rest may claim
        *verdict_section(data),  # then the answer to the study's question, the tables behind it after
        *main_comparison(data),
        *significance_section(data),
        *equivalence_section(data),
        *matched_section(data),
        *figure_section(figures, "curves", "Training curves"),
        *figure_section(figures, "cost", "Quality against cost"),
        *figure_section(figures, "utilisation", "Expert utilisation"),
        *tuning_summary(data, tuning),
        *figure_section(figures, "tuning"),
        *failures(data),
    ]
