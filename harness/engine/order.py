"""Cells in an order that runs every dependency's source first (``Cell.depends_on``)."""

from __future__ import annotations

from graphlib import CycleError, TopologicalSorter

from harness.config import SpecError
from harness.matrix import Cell


def in_dependency_order(cells: list[Cell]) -> list[Cell]:
    """``cells`` with each source before its dependents, otherwise in matrix order (stdlib ``graphlib``)."""
    by_key = {cell.key: cell for cell in cells}
    graph = {cell.key: [cell.depends_on] if cell.depends_on in by_key else [] for cell in cells}
    sorter = TopologicalSorter(graph)
    try:
        sorter.prepare()
    except CycleError as error:
        raise SpecError(f"cell dependencies form a cycle: {' -> '.join(error.args[1])}") from None
    order: list[Cell] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=list(by_key).index)  # matrix order among the ready ones
        order += [by_key[key] for key in ready]
        sorter.done(*ready)
    return order
