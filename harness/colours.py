"""One colour per variant, shared by the report's figures and the MLflow UI (each trial run's ``mlflow.runColor``
tag): the Okabe-Ito palette for the built-in variants, Paul Tol's muted palette for a spec's own variant names (so a
custom name never takes a built-in's colour), both readable by colour-blind readers."""

from __future__ import annotations

import zlib

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
VARIANT_COLOURS = {
    "baseline": "#0072B2",
    "switch": "#E69F00",
    "lora": "#009E73",
    "hybrid": "#CC79A7",
    "dense": "#000000",
    "plain": "#999999",
}
CUSTOM_COLOURS = ["#56B4E9", "#D55E00", "#882255", "#44AA99", "#DDCC77", "#117733", "#AA4499", "#332288", "#88CCEE"]


def colour(variant: str, index: int | None = None) -> str:
    """A built-in variant's colour; another variant's by ``index`` (its place in a figure) or, without one, by a
    hash of its name (the same in every run and session)."""
    if variant in VARIANT_COLOURS:
        return VARIANT_COLOURS[variant]
    return CUSTOM_COLOURS[(zlib.crc32(variant.encode()) if index is None else index) % len(CUSTOM_COLOURS)]
