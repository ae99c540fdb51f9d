"""How numbers read in the report's tables and sentences ('–' wherever there is no value)."""

from __future__ import annotations

import math

from harness.report.significance import Summary

MISSING = "–"


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


def mean_sd(s: Summary, digits: int = 2) -> str:
    if s.n == 0:
        return MISSING
    return fmt(s.mean, digits) if s.n < 2 else f"{fmt(s.mean, digits)} ± {fmt(s.sd, digits)}"


def ci(s: Summary, digits: int = 2) -> str:
    return MISSING if s.n < 2 else f"[{fmt(s.ci_low, digits)}, {fmt(s.ci_high, digits)}]"


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
