"""What the report says, section by section: ``build_document`` lists the sections in order.

A section is a function returning a list of blocks (``harness.report.blocks``) from ``overview`` (what ran and
whether it trained) or ``findings`` (what the study found); adding one is a function there and one line here.
Figures are made first and carry the key of the section that shows them, so a section can pick its own.
"""

from __future__ import annotations

from datetime import datetime

import optuna

from harness.report.blocks import Block, Figure
from harness.report.findings import (
    Tests,
    equivalence_section,
    main_comparison,
    matched_section,
    significance_section,
    verdict_section,
)
from harness.report.gather import StudyData
from harness.report.overview import failures, figure_section, header, health_section, tuning_only_note, tuning_summary
from harness.report.sequential_design import sequential_section


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
    return [
        *header(data, generated),
        *health_section(data, figures),  # first: whether each trial trained decides what the rest may claim
        *verdict_section(data, tests),  # then the answer to the study's question, the tables behind it after
        *sequential_section(data),  # a sequential study: how each comparison was decided, look by look
        *main_comparison(data, tests),
        *significance_section(data, tests),
        *equivalence_section(data, tests),
        *matched_section(data, tests),
        *figure_section(figures, "curves", "Training curves"),
        *figure_section(figures, "cost", "Quality against cost"),
        *figure_section(figures, "utilisation", "Expert utilisation"),
        *tuning_summary(data, tuning),
        *figure_section(figures, "tuning"),
        *failures(data),
    ]
