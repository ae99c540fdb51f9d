"""The report's content as one document model, rendered to Markdown and to an A4 PDF (reportlab).

``build_document`` decides what the report says (header, tables, significance statements, figures,
failures); ``to_markdown`` and ``to_pdf`` only lay the same blocks out, so both files agree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from harness.statistics import ALPHA, Comparison, Summary, compare, describe

if TYPE_CHECKING:
    from harness.plots import Figure
    from harness.report import StudyData


# ---------------------------------------------------------------- document model


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str  # **bold** and `code` are the only inline markup


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells marked best
    caption: str = ""


@dataclass
class Image:
    figure: Figure


Block = Heading | Para | Bullets | Table | Image


# ---------------------------------------------------------------- content

LOWER, HIGHER = "lower", "higher"


def fmt(value: float, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:,.{digits}f}"


def fmt_count(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{int(round(value)):,}"


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {sec:02d} s" if hours else f"{minutes} min {sec:02d} s"


def mean_sd(s: Summary, digits: int = 2) -> str:
    if s.n == 0:
        return "–"
    return fmt(s.mean, digits) if s.n < 2 else f"{fmt(s.mean, digits)} ± {fmt(s.sd, digits)}"


def ci(s: Summary, digits: int = 2) -> str:
    return "–" if s.n < 2 else f"[{fmt(s.ci_low, digits)}, {fmt(s.ci_high, digits)}]"


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _metric(rows: pd.DataFrame, name: str) -> list[float]:
    column = f"metrics.{name}"
    return rows[column].dropna().astype(float).tolist() if column in rows else []


def load_cv(rows: pd.DataFrame) -> list[float]:
    """Per run: the validation load CV averaged over MoE layers (util_val_cv_l<layer>)."""
    columns = [c for c in rows.columns if re.fullmatch(r"metrics\.util_val_cv_l\d+", c)]
    if not columns:
        return []
    return rows[columns].mean(axis=1, skipna=True).dropna().tolist()


def peak_memory(data: StudyData) -> tuple[str, str]:
    runs = data.finished
    if "metrics.gpu_mem_peak_nvml_mb" in runs and runs["metrics.gpu_mem_peak_nvml_mb"].notna().any():
        return "gpu_mem_peak_nvml_mb", "Peak GPU mem (MB)"
    return "peak_rss_mb", "Peak RSS (MB)"


def _best(table_rows: list[list[float]], column: int, direction: str) -> set[int]:
    values = [(r[column], i) for i, r in enumerate(table_rows) if r[column] is not None and math.isfinite(r[column])]
    if len(values) < 2:
        return set()
    target = min(v for v, _ in values) if direction == LOWER else max(v for v, _ in values)
    return {i for v, i in values if v == target}


def per_variant(data: StudyData, backbone: str) -> list[tuple[str, pd.DataFrame]]:
    from harness.report import variant_key

    runs = data.finished[data.finished["tags.backbone"] == backbone]
    return [(v, runs[runs["tags.variant"] == v]) for v in sorted(runs["tags.variant"].unique(), key=variant_key)]


def quality_table(data: StudyData, backbone: str) -> Table:
    header = ["Variant", "n", "Val PPL (mean ± sd)", "Val PPL 95% CI", "Test PPL (mean ± sd)", "Test PPL 95% CI"]
    rows, raw = [], []
    for variant, runs in per_variant(data, backbone):
        val, test = describe(_metric(runs, "final_val_ppl")), describe(_metric(runs, "test_ppl"))
        rows.append([variant, str(len(runs)), mean_sd(val), ci(val), mean_sd(test), ci(test)])
        raw.append([None, None, val.mean, None, test.mean, None])
    bold = {(i, c) for c in (2, 4) for i in _best(raw, c, LOWER)}
    return Table(
        header,
        rows,
        bold,
        "Perplexity on the full validation and test splits after the token budget; "
        "mean ± sample sd over seeds, 95% CI of the mean from the t distribution. Bold: best (lowest).",
    )


def cost_table(data: StudyData, backbone: str) -> Table:
    memory_metric, memory_label = peak_memory(data)
    columns = [
        ("Params total", "params_total", fmt_count, LOWER),
        ("Trainable", "params_trainable", fmt_count, LOWER),
        ("Active / token", "params_active", fmt_count, LOWER),
        ("Time / Mtok (s)", "time_per_mtok_s", lambda v: fmt(v, 1), LOWER),
        ("Tokens / s", "train_tokens_per_s", fmt_count, HIGHER),
        (memory_label, memory_metric, lambda v: fmt(v, 0), LOWER),
        ("Aux loss", "aux_loss", lambda v: fmt(v, 4), LOWER),
        ("Load CV", None, lambda v: fmt(v, 3), LOWER),
    ]
    rows, raw = [], []
    for variant, runs in per_variant(data, backbone):
        means = []
        for _, metric, _, _ in columns:
            values = load_cv(runs) if metric is None else _metric(runs, metric)
            means.append(describe(values).mean if values else math.nan)
        if variant == "dense":  # no router: no aux loss and no load to balance
            means[-2:] = [math.nan, math.nan]
        rows.append([variant] + [f(m) for (_, _, f, _), m in zip(columns, means, strict=True)])
        raw.append([None, *means])
    bold = {(i, c + 1) for c, (*_, direction) in enumerate(columns) for i in _best(raw, c + 1, direction)}
    return Table(
        ["Variant"] + [c[0] for c in columns],
        rows,
        bold,
        "Means over seeds. Time per million training tokens excludes evaluation. Aux loss: router balance loss in "
        "the last logging window; load CV: coefficient of variation of expert shares on the validation split, "
        "averaged over MoE layers (0 = perfectly balanced). Bold: best (highest tokens/s, lowest otherwise).",
    )


def reference_variant(variants: list[str]) -> str | None:
    from harness.report import BASELINE

    if BASELINE in variants:
        return BASELINE
    return variants[0] if variants else None


def significance(data: StudyData, backbone: str, several: bool) -> list[Block]:
    groups = dict(per_variant(data, backbone))
    reference = reference_variant(list(groups))
    where = f" ({backbone} backbone)" if several else ""
    planned = data.runs[data.runs["tags.backbone"] == backbone]["tags.seed"].nunique()
    max_seeds = max((len(runs) for runs in groups.values()), default=0)
    if planned < 2 or max_seeds < 2:
        seeds = "a single seed" if planned < 2 else "a single finished seed"
        return [
            Para(
                f"Each variant{where} has {seeds}, so **no significance can be claimed**: the differences in the "
                "tables are single observations with no estimate of seed-to-seed variation. Run at least two seeds "
                "(three or more for useful power) to test them."
            )
        ]
    if reference is None or len(groups) < 2:
        return [Para(f"Only one variant finished{where}: there is nothing to compare.")]
    blocks: list[Block] = []
    base = _by_seed(groups[reference])
    rows, holds, fails, untestable = [], [], [], []
    for variant, runs in groups.items():
        if variant == reference:
            continue
        result: Comparison | None = compare(base, _by_seed(runs))
        if result is None:
            untestable.append(variant)
            rows.append([variant, "–", str(len(runs)), "–", "–", "–", "–"])
            continue
        rows.append(
            [
                variant,
                result.test,
                str(result.n),
                f"{result.difference:+,.2f}",
                fmt(result.statistic, 2),
                p_text(result.p_value),
                f"{result.effect_name} = {fmt(result.effect, 2)}",
            ]
        )
        direction = "lower" if result.difference < 0 else "higher"
        text = f"{variant} ({direction} test PPL by {abs(result.difference):,.2f}, p = {p_text(result.p_value)})"
        (holds if result.significant else fails).append(text)
    blocks.append(
        Table(
            ["Variant", "Test", "n", f"Δ test PPL vs {reference}", "t", "p", "Effect size"],
            rows,
            caption=f"Each variant against {reference} on final test perplexity. Paired t-test on per-seed "
            "differences when both ran the same seeds (effect size d_z = mean difference / sd of differences); "
            "Welch's t-test otherwise (effect size Cohen's d with pooled sd). Two-sided, no correction for "
            "multiple comparisons.",
        )
    )
    level = f"{ALPHA:.0%}"
    sentences = []
    if holds:
        sentences.append(
            f"At the {level} level, these differences from {reference} are significant: {'; '.join(holds)}."
        )
    else:
        sentences.append(f"At the {level} level, no variant differs significantly from {reference}{where}.")
    if fails:
        sentences.append(f"Not significant at the {level} level: {'; '.join(fails)}.")
    if untestable:
        sentences.append(f"Too few seeds to test: {', '.join(untestable)}.")
    if max_seeds < 3:
        sentences.append(
            "With two seeds per variant the tests have very little power; a non-significant result is "
            "not evidence of no difference."
        )
    blocks.append(Para(" ".join(sentences)))
    return blocks


def _by_seed(runs: pd.DataFrame) -> dict[str, float]:
    return {str(s): float(v) for s, v in zip(runs["tags.seed"], runs["metrics.test_ppl"], strict=True)}


def _unique(runs: pd.DataFrame, column: str) -> list[str]:
    return sorted({str(v) for v in runs[column].dropna()}) if column in runs else []


def is_pruned(runs: pd.DataFrame) -> pd.Series:
    """Tuning trials the pruner stopped (``harness tune`` tags them ``optuna.state`` = PRUNED)."""
    if "tags.optuna.state" not in runs:
        return pd.Series(False, index=runs.index)
    return runs["tags.optuna.state"] == "PRUNED"


def _failure_reason(run: pd.Series, pruned: bool) -> str:
    reason = run.get("tags.harness.pruned") if pruned else run.get("tags.harness.error")
    return str(reason) if reason is not None and pd.notna(reason) else "no error recorded"


def header(data: StudyData, generated: datetime) -> list[Block]:
    from harness.report import variant_key

    runs = data.runs
    status = runs["status"].value_counts().to_dict()
    pruned = int(is_pruned(runs).sum())
    first = runs.iloc[0]
    data_name = first.get("params.data.name") or "–"
    splits = [
        f"{s} {fmt_count(float(first[f'tags.data.{s}_tokens']))}"
        for s in ("train", "validation", "test")
        if f"tags.data.{s}_tokens" in runs and pd.notna(first.get(f"tags.data.{s}_tokens"))
    ]
    vocab = first.get("tags.data.vocab_size")
    vocab_text = fmt_count(float(vocab)) if vocab is not None and pd.notna(vocab) else "not recorded"
    settings = ", ".join(
        f"{k.removeprefix('params.data.')} {first[k]}"
        for k in ("params.data.min_freq", "params.data.max_vocab")
        if k in runs and pd.notna(first.get(k))
    )
    variants = sorted(runs["tags.variant"].dropna().unique(), key=variant_key)
    seeds = sorted(runs["tags.seed"].dropna().unique(), key=lambda s: int(s) if s.lstrip("-").isdigit() else 0)
    train_time = runs["metrics.train_time_s"].sum() if "metrics.train_time_s" in runs else math.nan
    ended = runs["end_time"].fillna(runs["start_time"])
    wall = (ended - runs["start_time"]).dt.total_seconds().sum()
    budget = first.get("params.budget.tokens")
    items = [
        f"**Study:** {data.name} (MLflow experiment {data.experiment_id}"
        + (f", parent run `{data.parent.info.run_id}`)" if data.parent is not None else ")"),
        f"**Generated:** {generated:%Y-%m-%d %H:%M} UTC",
        f"**Git commit:** {', '.join(_unique(runs, 'tags.git_commit')) or 'not recorded'}",
        f"**Device(s):** {', '.join(_unique(runs, 'tags.device')) or 'not recorded'}",
        f"**Data:** {data_name}; split sizes (tokens): {', '.join(splits) or 'not recorded'}; vocabulary "
        f"{vocab_text}" + (f" ({settings})" if settings else ""),
        f"**Matrix:** variants {', '.join(variants)} × seeds {', '.join(seeds)}"
        + (
            f" × backbones {', '.join(data.backbones)}"
            if len(data.backbones) > 1
            else f"; backbone {data.backbones[0]}"
        )
        + (
            f"; budget {fmt_count(float(budget))} training tokens per trial"
            if budget not in (None, "None") and pd.notna(budget)
            else ""
        ),
        f"**Trials:** {len(runs)} — finished {status.get('FINISHED', 0)}, failed {status.get('FAILED', 0)}, "
        f"pruned {pruned}, killed/interrupted {status.get('KILLED', 0) - pruned}, running {status.get('RUNNING', 0)}",
        f"**Total compute time:** {fmt_duration(train_time)} of training (sum of train_time_s), "
        f"{fmt_duration(wall)} wall time over all trial runs (including evaluation)",
    ]
    return [Heading(f"Study report: {data.name}", 1), Bullets(items)]


def failures(data: StudyData) -> list[Block]:
    failed = data.failed
    blocks: list[Block] = [Heading("Failed trials")]
    if failed.empty:
        blocks.append(Para(f"None: all {len(data.runs)} trials finished."))
        return blocks
    pruned = is_pruned(failed)
    n_pruned = int(pruned.sum())
    blocks.append(
        Para(
            f"{len(failed)} of {len(data.runs)} trials did not finish ({n_pruned} pruned by the tuner, "
            f"{len(failed) - n_pruned} failed or interrupted); they are left out of the tables and statistics above."
        )
    )
    rows = [
        [
            str(r["tags.harness.cell"] or r["tags.variant"]),
            "PRUNED" if pruned[i] else str(r["status"]),
            _failure_reason(r, bool(pruned[i])),
        ]
        for i, r in failed.iterrows()
    ]
    blocks.append(Table(["Trial", "Status", "Error"], rows))
    return blocks


def tuning_summary(data: StudyData, study: object | None) -> list[Block]:
    if study is None:
        return []
    import optuna

    trials = study.trials
    states = pd.Series([t.state.name.lower() for t in trials]).value_counts().to_dict()
    blocks: list[Block] = [Heading("Hyperparameter tuning")]
    blocks.append(
        Para(
            f"Optuna study `{study.study_name}` ({data.tag('optuna.storage')}): {len(trials)} trials ("
            + ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
            + "); directions "
            + ", ".join(d.name.lower() for d in study.directions)
            + "."
        )
    )
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
        best = study.best_trials
        rows = [
            [str(t.number)]
            + [fmt(v, 3) for v in t.values]
            + [", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())]
            for t in best[:10]
        ]
        blocks.append(
            Table(
                ["Trial", *names, "Parameters"],
                rows,
                caption="Best trial" if len(best) == 1 else "Pareto-optimal trials (up to 10)",
            )
        )
    return blocks


def build_document(
    data: StudyData, figures: list[Figure], generated: datetime, tuning: object | None = None
) -> list[Block]:
    several = len(data.backbones) > 1
    doc = header(data, generated)
    if data.tuning_only:
        doc.append(
            Para(
                f"This experiment holds only tuning trials ({len(data.runs)}), each with different hyperparameters, "
                "so there is no per-variant comparison over seeds and no significance test. Run `harness run-study` "
                "on the best configuration with several seeds for that."
            )
        )
        doc.extend(tuning_summary(data, tuning))
        doc.extend(Image(f) for f in figures if f.section == "tuning")
        doc.extend(failures(data))
        return doc
    doc.append(Heading("Main comparison"))
    if data.finished.empty:
        doc.append(Para("No trial finished, so there is nothing to compare."))
    for backbone in data.backbones:
        if data.finished[data.finished["tags.backbone"] == backbone].empty:
            continue
        if several:
            doc.append(Heading(f"Backbone: {backbone}", 3))
        doc.append(quality_table(data, backbone))
        doc.append(cost_table(data, backbone))
    doc.append(Heading("Significance"))
    for backbone in data.backbones:
        if not data.finished[data.finished["tags.backbone"] == backbone].empty:
            doc.extend(significance(data, backbone, several))
    titles = {"curves": "Training curves", "cost": "Quality against cost", "utilisation": "Expert utilisation"}
    for section, title in titles.items():
        chosen = [f for f in figures if f.section == section]
        if chosen:
            doc.append(Heading(title))
            doc.extend(Image(f) for f in chosen)
    doc.extend(tuning_summary(data, tuning))
    doc.extend(Image(f) for f in figures if f.section == "tuning")
    doc.extend(failures(data))
    return doc


# ---------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: list[Block]) -> str:
    out: list[str] = []
    for block in doc:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}\n")
        elif isinstance(block, Para):
            out.append(block.text + "\n")
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items) + "\n")
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(block.header) + " |", "|" + "|".join(["---"] * len(block.header)) + "|"]
            for i, row in enumerate(block.rows):
                cells = [f"**{_md_cell(c)}**" if (i, j) in block.bold else _md_cell(c) for j, c in enumerate(row)]
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines) + "\n")
            if block.caption:
                out.append(f"*{block.caption}*\n")
        elif isinstance(block, Image):
            out.append(
                f"![{block.figure.title}]({block.figure.file})\n\n*{block.figure.title}.* {block.figure.caption}\n"
            )
    return "\n".join(out)


# ---------------------------------------------------------------- PDF


def _inline(text: str) -> str:
    from xml.sax.saxutils import escape

    text = escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<font face='Courier'>\1</font>", text)


def to_pdf(doc: list[Block], path: Path, base: Path) -> int:
    """Write the PDF (A4, page numbers 'page n of m'); returns the page count."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Image as RLImage
    from reportlab.platypus import KeepTogether, LongTable, Paragraph, SimpleDocTemplate, Spacer, TableStyle

    styles = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=styles["BodyText"], fontSize=9, leading=11.5)
    cell = ParagraphStyle("cell", parent=body, fontSize=7.5, leading=9)
    head = ParagraphStyle("head", parent=cell, textColor=colors.white, fontName="Helvetica-Bold")
    caption = ParagraphStyle("caption", parent=body, fontSize=7.5, leading=9.5, textColor=colors.HexColor("#333333"))
    headings = {
        level: ParagraphStyle(f"h{level}", parent=styles[name], keepWithNext=1)
        for level, name in ((1, "Title"), (2, "Heading2"), (3, "Heading3"))
    }
    margin = 16 * mm
    width = A4[0] - 2 * margin

    def story() -> list:
        flow: list = []
        for block in doc:
            if isinstance(block, Heading):
                flow.append(Paragraph(_inline(block.text), headings[block.level]))
            elif isinstance(block, Para):
                flow.extend([Paragraph(_inline(block.text), body), Spacer(1, 4)])
            elif isinstance(block, Bullets):
                flow.extend(Paragraph(_inline(item), body, bulletText="•") for item in block.items)
                flow.append(Spacer(1, 4))
            elif isinstance(block, Table):
                data = [[Paragraph(_inline(h), head) for h in block.header]]
                for i, row in enumerate(block.rows):
                    data.append(
                        [
                            Paragraph(f"<b>{_inline(c)}</b>" if (i, j) in block.bold else _inline(c), cell)
                            for j, c in enumerate(row)
                        ]
                    )
                table = LongTable(data, colWidths=_col_widths(block, width), repeatRows=1, hAlign="LEFT")
                table.setStyle(
                    TableStyle(
                        [
                            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#34495E")),
                            ("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white, colors.HexColor("#EEF2F5")]),
                            ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#B0B8C0")),
                            ("VALIGN", (0, 0), (-1, -1), "TOP"),
                            ("LEFTPADDING", (0, 0), (-1, -1), 3),
                            ("RIGHTPADDING", (0, 0), (-1, -1), 3),
                        ]
                    )
                )
                parts = [table] + ([Spacer(1, 2), Paragraph(_inline(block.caption), caption)] if block.caption else [])
                flow.append(KeepTogether(parts) if len(block.rows) < 25 else parts[0])
                if block.caption and len(block.rows) >= 25:
                    flow.extend(parts[1:])
                flow.append(Spacer(1, 8))
            elif isinstance(block, Image):
                from PIL import Image as PILImage

                file = base / block.figure.file
                with PILImage.open(file) as im:
                    w, h = im.size
                scale = min(width / w, 120 * mm / h)
                flow.append(
                    KeepTogether(
                        [
                            RLImage(str(file), width=w * scale, height=h * scale),
                            Paragraph(
                                f"<b>{_inline(block.figure.title)}.</b> {_inline(block.figure.caption)}", caption
                            ),
                            Spacer(1, 8),
                        ]
                    )
                )
        return _glue_headings(flow, KeepTogether)

    title = next((b.text for b in doc if isinstance(b, Heading)), "Study report")
    pages = {"total": 0}

    def footer(canvas, document) -> None:  # noqa: ANN001 (reportlab callback)
        canvas.saveState()
        canvas.setFont("Helvetica", 8)
        canvas.setFillColor(colors.HexColor("#555555"))
        total = pages["total"]
        number = f"page {document.page} of {total}" if total else f"page {document.page}"
        canvas.drawRightString(A4[0] - margin, 9 * mm, number)
        canvas.drawString(margin, 9 * mm, title)
        canvas.restoreState()
        pages["count"] = document.page

    for _ in range(2):  # first pass counts the pages, second writes "page n of m"
        template = SimpleDocTemplate(
            str(path),
            pagesize=A4,
            leftMargin=margin,
            rightMargin=margin,
            topMargin=margin,
            bottomMargin=18 * mm,
            title=title,
            author="moe-harness",
        )
        template.build(story(), onFirstPage=footer, onLaterPages=footer)
        pages["total"] = pages["count"]
    return pages["total"]


def _glue_headings(flow: list, keep_together: type) -> list:
    """Each heading travels with the flowable after it, so no heading is left alone at a page foot."""
    glued, pending = [], []
    for item in flow:
        if getattr(getattr(item, "style", None), "keepWithNext", 0):
            pending.append(item)
        elif pending:
            content = item._content if isinstance(item, keep_together) else [item]
            glued.append(keep_together(pending + list(content)))
            pending = []
        else:
            glued.append(item)
    return glued + pending


def _col_widths(table: Table, width: float) -> list[float]:
    """Widths in proportion to each column's longest text, the first (name) column never squeezed."""
    lengths = []
    for j, h in enumerate(table.header):
        longest = max([len(h) * 0.85] + [len(r[j]) for r in table.rows])
        lengths.append(min(max(longest + 2, 8), 90))  # +2: padding, so short words never wrap
    total = sum(lengths)
    return [width * n / total for n in lengths]
