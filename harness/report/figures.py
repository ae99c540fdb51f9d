"""The report's figures, written as PNGs: readable in print, labelled axes with units, colour-blind-safe.

Colours are the Okabe-Ito palette, one fixed colour per variant so every figure agrees; heatmaps
use a diverging map centred on the uniform share (blue below, red above, white = uniform).
"""
# Over 350 lines: every figure of the report, each a short function of its own; split they would only share imports.

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from harness.colours import OKABE_ITO, colour  # noqa: E402
from harness.report.blocks import Figure  # noqa: E402
from harness.report.gather import (  # noqa: E402
    GRAD_COMPONENTS,
    HEALTH_UNKNOWN,
    StudyData,
    flops_per_token,
    variant_key,
)
from harness.report.statistics import BackboneTests  # noqa: E402
from harness.tags import HEALTH  # noqa: E402

MARKERS = {"baseline": "o", "switch": "s", "lora": "^", "hybrid": "D", "dense": "X", "plain": "P"}
DPI = 150


STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _save(fig: plt.Figure, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return name


def _groups(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(backbone, variant, rows) in report order."""
    keys = frame[["backbone", "variant"]].drop_duplicates().itertuples(index=False)
    ordered = sorted(keys, key=lambda k: (str(k.backbone), variant_key(str(k.variant))))
    return [
        (k.backbone, k.variant, frame[(frame.backbone == k.backbone) & (frame.variant == k.variant)]) for k in ordered
    ]


def _max_seeds(frame: pd.DataFrame) -> int:
    return int(frame.groupby(["backbone", "variant"])["seed"].nunique().max()) if not frame.empty else 0


def _label(backbone: str, variant: str, several: bool) -> str:
    return f"{variant} ({backbone})" if several else variant


def val_curves(data: StudyData, out: Path) -> Figure | None:
    curves = data.curves
    if curves.empty:
        return None
    several = curves["backbone"].nunique() > 1
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (backbone, variant, rows) in enumerate(_groups(curves)):
        by_step = rows.groupby("step").agg(
            tokens=("tokens", "mean"), mean=("val_ppl", "mean"), low=("val_ppl", "min"), high=("val_ppl", "max")
        )
        style = "--" if several and backbone != sorted(curves["backbone"].unique())[0] else "-"
        c = colour(variant, i)
        ax.plot(
            by_step["tokens"],
            by_step["mean"],
            style,
            color=c,
            marker=MARKERS.get(variant, "o"),
            markersize=3,
            label=_label(backbone, variant, several),
        )
        ax.fill_between(by_step["tokens"], by_step["low"], by_step["high"], color=c, alpha=0.18, linewidth=0)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
    ax.legend(title="variant", frameon=False)
    name = _save(fig, out, "val_ppl_vs_tokens.png")
    return Figure(
        name,
        "Validation perplexity during training",
        (
            "Mean over seeds (line) with the min-max range across seeds (band)."
            if _max_seeds(curves) > 1
            else "One seed per variant: each line is a single run."
        )
        + " Every point is the one measure the runs logged mid-run (the first `budget.eval_tokens` validation tokens,"
        " or the full split where that is unset), the last at the end of training; the full-split figures after"
        " training are in the tables.",
        "curves",
    )


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated when lower is better on both axes, sorted by x."""
    front, best = [], np.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def cost_quality(data: StudyData, out: Path) -> Figure | None:
    runs = data.finished
    needed = ["metrics.test_ppl", "metrics.params_trainable", "metrics.time_per_mtok_s"]
    if runs.empty or any(c not in runs for c in needed):
        return None
    several = runs["tags.backbone"].nunique() > 1
    fig, axes = plt.subplots(1, 3, figsize=(10.0, 3.4), sharey=True)
    frame = runs.rename(columns={"tags.variant": "variant", "tags.backbone": "backbone", "tags.seed": "seed"})
    per_token = {run_id: flops_per_token(config) for run_id, config in data.configs.items()}
    frame["flops_per_token"] = frame["run_id"].map(per_token).astype(float)
    for ax, column, label in [
        (axes[0], "metrics.params_trainable", "trainable parameters"),
        (axes[1], "flops_per_token", "training FLOPs per token"),
        (axes[2], "metrics.time_per_mtok_s", "training time per million tokens (s)"),
    ]:
        means = []
        for i, (backbone, variant, rows) in enumerate(_groups(frame)):
            c, marker = colour(variant, i), MARKERS.get(variant, "o")
            ax.scatter(rows[column], rows["metrics.test_ppl"], color=c, marker=marker, alpha=0.35, s=14)
            x, y = rows[column].mean(), rows["metrics.test_ppl"].mean()
            xerr = rows[column].std() if len(rows) > 1 else None
            yerr = rows["metrics.test_ppl"].std() if len(rows) > 1 else None
            ax.errorbar(
                x,
                y,
                xerr=xerr,
                yerr=yerr,
                color=c,
                marker=marker,
                markersize=7,
                capsize=2,
                label=_label(backbone, variant, several),
                linestyle="none",
            )
            means.append((x, y))
        front = _pareto(means)
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), ":", color="grey", linewidth=1, label="Pareto front (means)")
        ax.set_xlabel(label)
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
    axes[0].set_ylabel("test perplexity")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(6, len(labels)), frameon=False, bbox_to_anchor=(0.5, 1.08))
    fig.tight_layout()
    name = _save(fig, out, "test_ppl_vs_cost.png")
    return Figure(
        name,
        "Quality against cost",
        "Final test perplexity against trainable parameters (left), training FLOPs per token (middle: the active "
        "compute, harness/flops.py) and training time per million tokens (right). "
        + ("Small markers: single seeds; large markers: mean ± sd; " if _max_seeds(frame) > 1 else "One seed each; ")
        + "dotted line: variants no other variant beats on both axes (lower-left is better).",
        "cost",
    )


def _moe_panels(frame: pd.DataFrame, column: str, value: object) -> tuple[pd.DataFrame, list, int, int]:
    """Rows where ``column`` == ``value``; their MoE (not dense) groups, one panel each; panel rows, columns."""
    if frame.empty:
        return frame, [], 0, 0
    frame = frame[frame[column] == value]
    groups = [g for g in _groups(frame) if g[1] != "dense"]
    cols = min(2, len(groups))
    return frame, groups, (len(groups) + cols - 1) // max(cols, 1), cols


def _shares_colourbar(fig: plt.Figure, axes: np.ndarray, norm: TwoSlopeNorm) -> None:
    """One colour bar for all panels, the uniform share marked and labelled on it."""
    uniform, vmax = float(norm.vcenter), float(norm.vmax)
    bar = fig.colorbar(axes.flat[0].collections[0], ax=axes.ravel().tolist(), shrink=0.9)
    bar.set_label("share of routed tokens")
    bar.outline.set_linewidth(0)
    bar.ax.axhline(uniform, color="black", linewidth=1.5)
    ticks = sorted({0.0, uniform, *[t for t in np.linspace(0, vmax, 5)[1:] if abs(t - uniform) > 0.18 * vmax]})
    bar.set_ticks(ticks, labels=[f"{t:.2f}" + (" uniform" if t == uniform else "") for t in ticks])


def utilisation_heatmaps(data: StudyData, out: Path, split: str = "validation") -> Figure | None:
    table, groups, rows_n, cols = _moe_panels(data.utilisation, "split", split)
    if not groups:
        return None
    several = table["backbone"].nunique() > 1
    n_experts = int(table["expert"].max()) + 1
    uniform = 1.0 / n_experts
    vmax = max(float(table.groupby(["backbone", "variant", "layer", "expert"])["share"].mean().max()), uniform * 1.5)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=vmax)
    n_layers = int(table["layer"].max()) + 1
    fig, axes = plt.subplots(
        rows_n, cols, figsize=(3.4 * cols + 0.8, (0.5 * n_layers + 1.6) * rows_n), squeeze=False, layout="constrained"
    )
    for ax, (backbone, variant, rows) in zip(axes.flat, groups, strict=False):
        grid = rows.groupby(["layer", "expert"])["share"].mean().unstack("expert").sort_index()
        sns.heatmap(grid, ax=ax, cmap="RdBu_r", norm=norm, annot=True, fmt=".2f", annot_kws={"fontsize": 7}, cbar=False)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.tick_params(axis="y", labelrotation=0)
        ax.grid(False)  # the report style's grid would cross the cells
        n_seeds = rows["seed"].nunique()
        ax.set_title(f"{_label(backbone, variant, several)} (n={n_seeds} seed{'s' if n_seeds != 1 else ''})")
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    _shares_colourbar(fig, axes, norm)
    name = _save(fig, out, f"utilisation_{split}.png")
    return Figure(
        name,
        f"Expert utilisation ({split} split)",
        f"Share of routed tokens per expert and MoE layer, averaged over seeds. White is the uniform share "
        f"1/{n_experts} = {uniform:.3f}; red experts take more than their share, blue less. "
        + (
            "Training split: counted over the whole run in training mode (noisy top-k routers add noise there)."
            if split == "train"
            else "Validation split: the final model in evaluation mode."
        ),
        "utilisation",
    )


def utilisation_over_training(data: StudyData, out: Path, layer: int = 0) -> Figure | None:
    history, groups, rows_n, cols = _moe_panels(data.history, "layer", layer)
    if not groups:
        return None
    several = history["backbone"].nunique() > 1
    n_experts = int(history["expert"].max()) + 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 2.5 * rows_n), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis", n_experts)
    for ax, (backbone, variant, rows) in zip(axes.flat, groups, strict=False):
        mean = rows.groupby(["step", "expert"]).agg(tokens=("tokens", "mean"), share=("share", "mean")).reset_index()
        for expert, line in mean.groupby("expert"):
            ax.plot(line["tokens"], line["share"], color=cmap(int(expert)), linewidth=1.2, label=f"expert {expert}")
        ax.axhline(1.0 / n_experts, color="black", linestyle="--", linewidth=1, label="uniform")
        ax.set_title(_label(backbone, variant, several))
        ax.set_xlabel("training tokens")
        ax.set_ylabel("share of routed tokens")
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=min(n_experts + 1, 9), frameon=False, bbox_to_anchor=(0.5, 1.06)
    )
    fig.tight_layout()
    name = _save(fig, out, f"utilisation_history_layer{layer}.png")
    return Figure(
        name,
        f"Expert utilisation during training (MoE layer {layer})",
        "Share of routed tokens per expert in each logging window, averaged over seeds; dashed: uniform share.",
        "utilisation",
    )


def _tuning_figure(ax: plt.Axes, out: Path, file: str, title: str, caption: str) -> Figure:
    return Figure(_save(ax.figure, out, file), title, caption, "tuning")


def tuning_figures(study: optuna.Study, out: Path) -> list[Figure]:
    """Optuna's own matplotlib views: history, importances, and the Pareto front for two objectives."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return []
    multi = len(study.directions) > 1
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    target = (lambda t: t.values[0]) if multi else None
    target_name = names[0] if multi else (names[0] if study.metric_names else "objective value")
    figures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        ax = optuna_plots.plot_optimization_history(study, target=target, target_name=target_name)
        caption = f"{target_name} per trial{'' if multi else ' and the best so far'} ({len(done)} completed trials)."
        figures.append(_tuning_figure(ax, out, "tuning_history.png", "Optimisation history", caption))
        if len(done) >= 2 and any(t.params for t in done):
            try:
                ax = optuna_plots.plot_param_importances(study, target=target, target_name=target_name)
                caption = f"fANOVA importance of each tuned parameter for {target_name}."
                figures.append(_tuning_figure(ax, out, "tuning_importances.png", "Hyperparameter importances", caption))
            except (RuntimeError, ValueError) as error:  # e.g. a parameter with a single value
                print(f"harness report: no parameter importances ({error})")
        if len(study.directions) == 2:
            ax = optuna_plots.plot_pareto_front(study, target_names=names[:2])
            caption = (
                f"Completed trials on the two objectives ({names[0]}, {names[1]}); "
                "the highlighted trials are not dominated."
            )
            figures.append(_tuning_figure(ax, out, "tuning_pareto.png", "Pareto front", caption))
    return figures


def grad_norm_curves(data: StudyData, out: Path) -> Figure | None:
    """Small multiples, one panel per (backbone, variant): each component's gradient norm before clipping."""
    norms = data.grad_norms
    if norms.empty:
        return None
    groups = _groups(norms)
    several = norms["backbone"].nunique() > 1
    n_cols = min(3, len(groups))
    n_rows = -(-len(groups) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.4 * n_cols, 2.3 * n_rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, (backbone, variant, rows) in zip(axes.flat, groups, strict=False):
        for i, component in enumerate(GRAD_COMPONENTS):
            series = rows[rows["component"] == component].groupby("step")["grad_norm"].mean().clip(lower=1e-6)
            if series.empty:  # e.g. no router in dense
                continue
            total = component == "total"
            colour_ = "black" if total else OKABE_ITO[i]
            ax.plot(series.index, series, "--" if total else "-", color=colour_, linewidth=1.0, label=component)
        trials = data.finished[data.finished["run_id"].isin(rows["run_id"])]
        verdicts = sorted(set(trials[f"tags.{HEALTH}"].fillna(HEALTH_UNKNOWN)))
        ax.set_title(f"{_label(backbone, variant, several)}: {', '.join(verdicts)}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    for row in axes:
        row[0].set_ylabel("grad norm (before clip)")
    fig.tight_layout()
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(handles.values(), handles.keys(), frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    name = _save(fig, out, "grad_norms.png")
    return Figure(
        name,
        "Gradient norm per component",
        "L2 norm of each component's gradient before clipping at the logging steps, mean over seeds (log scale, "
        "floored at 1e-6); dashed: all parameters. Panel titles: the health verdicts of the variant's trials. "
        "A component whose norm falls towards zero has stopped learning.",
        "health",
    )


VERDICT_FIGURE = "verdict.png"  # the headline figure, also at the study run's artifact root


def verdict_figure(data: StudyData, tests: dict[str, BackboneTests], out: Path) -> Figure | None:
    """Each variant's test-PPL ratio to the reference with its difference interval (thin) and margin interval
    (thick), on an axis that spans the intervals, so differences of a percent are visible."""
    rows = [(a, found.reference) for found in tests.values() for a in found.against.values() if a.look is not None]
    if not rows:
        return None
    margin = data.design.margin
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(rows) + 1.4))
    for y, (a, _) in enumerate(rows):
        look, c = a.look, colour(a.variant)
        for interval, width in ((look.difference, 1.2), (look.margin, 4.0)):
            if interval.bounded and interval.low > 0.01 and interval.high < 100:  # an early look's can be e^19,021
                ax.plot([interval.low, interval.high], [y, y], color=c, linewidth=width, solid_capstyle="butt")
        ax.plot(look.ratio, y, "o", color="white", markeredgecolor=c, markersize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(1 + margin, color="grey", linestyle="--", linewidth=0.8, label=f"margin {1 + margin:.2f}")
    ax.set_yticks(range(len(rows)), [f"{a.variant}: {a.words}" for a, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"test PPL ratio to {rows[0][1]} (left of 1: better)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the axes: never over an interval
    return Figure(
        _save(fig, out, VERDICT_FIGURE),
        "Test PPL ratio to the reference",
        "Each variant's test-PPL ratio (circle) with its difference interval (thin) and margin interval (thick): "
        "the repeated confidence intervals the design's decisions were read off (section Design and decisions).",
        "verdict",
    )


def make_figures(
    data: StudyData, out: Path, study: optuna.Study | None = None, tests: dict[str, BackboneTests] | None = None
) -> list[Figure]:
    """Every figure the data allows, written to ``out``; tuning studies get Optuna's views only."""
    with plt.rc_context(STYLE):
        figures = (
            []
            if data.tuning_only
            else [  # tuning trials differ in hyperparameters: no per-variant views
                verdict_figure(data, tests or {}, out),
                val_curves(data, out),
                grad_norm_curves(data, out),
                cost_quality(data, out),
                utilisation_heatmaps(data, out, "train"),
                utilisation_heatmaps(data, out, "validation"),
                utilisation_over_training(data, out),
            ]
        )
        if study is not None:
            figures.extend(tuning_figures(study, out))
    return [f for f in figures if f is not None]
