"""What the report says, section by section: ``build_document`` lists the sections in order.

A section is a function returning a list of blocks (``harness.report.blocks``) from ``overview`` (what ran and
whether it trained) or ``findings`` (what the study found); adding one is a function there and one line here.
Figures are made first and carry the key of the section that shows them, so a section can pick its own.
"""

from __future__ import annotations

from datetime import datetime

import optuna

from harness.report.blocks import Block, Figure
from harness.report.decisions import decisions_section
from harness.report.findings import Tests, main_comparison, matched_section, verdict_section
from harness.report.gather import StudyData
from harness.report.overview import (
    failures,
    figure_section,
    header,
    health_section,
    status_note,
    tuning_only_note,
    tuning_summary,
)


def build_document(
    data: StudyData, tests: Tests, figures: list[Figure], *, generated: datetime, tuning: optuna.Study | None = None
) -> list[Block]:
    if data.tuning_only:  # tuning trials differ in hyperparameters: no per-variant comparison
        return [
            *header(data, generated),
            tuning_only_note(data),
            *tuning_summary(data, tuning),
            *figure_section(figures, "tuning"),
            *failures(data),
        ]
    open_variants = [a.variant for found in tests.values() for a in found.against.values() if a.comparison.open]
    return [
        *header(data, generated),
        *status_note(data, open_variants),  # an unfinished study says so before anything else
        *health_section(data, figures),  # first: whether each trial trained decides what the rest may claim
        *verdict_section(data, tests, figures),  # then the answer to the study's question, the tables behind it after
        *decisions_section(data, tests),  # how the design decided each question, look by look
        *main_comparison(data, tests),
        *matched_section(data, tests),
        *figure_section(figures, "curves", "Training curves"),
        *figure_section(figures, "cost", "Quality against cost"),
        *figure_section(figures, "utilisation", "Expert utilisation"),
        *tuning_summary(data, tuning),
        *figure_section(figures, "tuning"),
        *failures(data),
    ]
