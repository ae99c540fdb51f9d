"""Retrying a step that workers starting together race on (tenacity)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy
import tenacity


def retry_race(lost_race: Callable[[BaseException], bool], attempts: int = 5, wait_s: float = 0.2) -> Any:
    """Decorator: retry while the error says another worker got there first (the next attempt uses its
    work), waiting ``wait_s``, ``2 * wait_s``, ...; any other error, or the last attempt's, is raised."""
    return tenacity.retry(
        retry=tenacity.retry_if_exception(lost_race),
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_incrementing(start=wait_s, increment=wait_s),
        reraise=True,
    )


def created_tables_concurrently(error: BaseException) -> bool:
    """PostgreSQL's CREATE TABLE from workers starting together: one wins, the others see these."""
    return isinstance(error, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.ProgrammingError)
