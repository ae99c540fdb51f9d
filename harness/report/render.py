"""The document written out: as Markdown (tables through tabulate's pipe format, figures as image links with
captions) and as an A4 PDF (reportlab, 'page n of m' footers). Both lay out the same blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from PIL import Image as PILImage
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Flowable, KeepTogether, LongTable, Paragraph, SimpleDocTemplate, Spacer, TableStyle
from reportlab.platypus import Image as RLImage
from reportlab.platypus.doctemplate import BaseDocTemplate
from tabulate import tabulate

from harness.report.blocks import Block, Bullets, Heading, Image, Para, Table

# ---------------------------------------------------------------- Markdown


def _cell(text: str, bold: bool) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if bold else text


def table_markdown(table: Table) -> str:
    """A pipe table, cells as given: no number parsing, and no padding (``| switch |`` is greppable)."""
    rows = [[_cell(c, (i, j) in table.bold) for j, c in enumerate(row)] for i, row in enumerate(table.rows)]
    text = tabulate(rows, table.header, tablefmt="pipe", stralign=None, numalign=None, disable_numparse=True)
    return text + "\n" + (f"\n*{table.caption}*\n" if table.caption else "")


def block_markdown(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}\n"
    if isinstance(block, Para):
        return block.text + "\n"
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items) + "\n"
    if isinstance(block, Table):
        return table_markdown(block)
    if isinstance(block, Image):
        figure = block.figure
        return f"![{figure.title}]({figure.file})\n\n*{figure.title}.* {figure.caption}\n"
    raise TypeError(f"no Markdown for {type(block).__name__}")


def to_markdown(doc: list[Block]) -> str:
    return "\n".join(block_markdown(block) for block in doc)


# ---------------------------------------------------------------- PDF

MARGIN = 16 * mm
WIDTH = A4[0] - 2 * MARGIN
LONG_TABLE_ROWS = 25  # from this many rows a table may break across pages; shorter ones stay whole
TABLE_STYLE = TableStyle(
    [
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#34495E")),
        ("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white, colors.HexColor("#EEF2F5")]),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#B0B8C0")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("LEFTPADDING", (0, 0), (-1, -1), 3),
        ("RIGHTPADDING", (0, 0), (-1, -1), 3),
    ]
)

Unit = list[Flowable]  # flowables that stay on one page together


@dataclass(frozen=True)
class Styles:
    body: ParagraphStyle
    cell: ParagraphStyle
    head: ParagraphStyle  # table header cells
    caption: ParagraphStyle
    headings: dict[int, ParagraphStyle]

    @classmethod
    def make(cls) -> Styles:
        sheet = getSampleStyleSheet()
        body = ParagraphStyle("body", parent=sheet["BodyText"], fontSize=9, leading=11.5)
        cell = ParagraphStyle("cell", parent=body, fontSize=7.5, leading=9)
        return cls(
            body=body,
            cell=cell,
            head=ParagraphStyle("head", parent=cell, textColor=colors.white, fontName="Helvetica-Bold"),
            caption=ParagraphStyle(
                "caption", parent=body, fontSize=7.5, leading=9.5, textColor=colors.HexColor("#333333")
            ),
            headings={
                level: ParagraphStyle(f"h{level}", parent=sheet[name], keepWithNext=1)
                for level, name in ((1, "Title"), (2, "Heading2"), (3, "Heading3"))
            },
        )


def _inline(text: str) -> str:
    """The blocks' inline markup (**bold**, `code`) as reportlab paragraph markup."""
    text = escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<font face='Courier'>\1</font>", text)


def _col_widths(table: Table, width: float) -> list[float]:
    """Widths in proportion to each column's longest text, the first (name) column never squeezed."""
    lengths = []
    for j, h in enumerate(table.header):
        longest = max([len(h) * 0.85] + [len(r[j]) for r in table.rows])
        lengths.append(min(max(longest + 2, 8), 90))  # +2: padding, so short words never wrap
    total = sum(lengths)
    return [width * n / total for n in lengths]


def _table_units(table: Table, styles: Styles) -> list[Unit]:
    cells = [[Paragraph(_inline(h), styles.head) for h in table.header]]
    for i, row in enumerate(table.rows):
        marked = [f"<b>{_inline(c)}</b>" if (i, j) in table.bold else _inline(c) for j, c in enumerate(row)]
        cells.append([Paragraph(text, styles.cell) for text in marked])
    grid = LongTable(cells, colWidths=_col_widths(table, WIDTH), repeatRows=1, hAlign="LEFT", style=TABLE_STYLE)
    caption = [Spacer(1, 2), Paragraph(_inline(table.caption), styles.caption)] if table.caption else []
    if len(table.rows) < LONG_TABLE_ROWS:
        return [[grid, *caption, Spacer(1, 8)]]
    return [[grid], *([f] for f in caption), [Spacer(1, 8)]]


def _image_units(image: Image, styles: Styles, base: Path) -> list[Unit]:
    file = base / image.figure.file
    with PILImage.open(file) as im:
        w, h = im.size
    scale = min(WIDTH / w, 120 * mm / h)
    title, caption = _inline(image.figure.title), _inline(image.figure.caption)
    picture = RLImage(str(file), width=w * scale, height=h * scale)
    return [[picture, Paragraph(f"<b>{title}.</b> {caption}", styles.caption), Spacer(1, 8)]]


def _units(block: Block, styles: Styles, base: Path) -> list[Unit]:
    if isinstance(block, Heading):
        return [[Paragraph(_inline(block.text), styles.headings[block.level])]]
    if isinstance(block, Para):
        return [[Paragraph(_inline(block.text), styles.body)], [Spacer(1, 4)]]
    if isinstance(block, Bullets):
        return [[Paragraph(_inline(item), styles.body, bulletText="•")] for item in block.items] + [[Spacer(1, 4)]]
    if isinstance(block, Table):
        return _table_units(block, styles)
    if isinstance(block, Image):
        return _image_units(block, styles, base)
    raise TypeError(f"no PDF layout for {type(block).__name__}")


def story(doc: list[Block], base: Path) -> list[Flowable]:
    """The flowables in order; each heading travels with the unit after it, so none is left at a page foot."""
    styles, flow, headings = Styles.make(), [], []
    for block in doc:
        for unit in _units(block, styles, base):
            if isinstance(block, Heading):
                headings.extend(unit)
                continue
            unit, headings = headings + unit, []
            flow.append(KeepTogether(unit) if len(unit) > 1 else unit[0])
    return flow + headings


class Footer:
    """Draws 'title ... page n of m' on every page; ``total`` is known after a first build."""

    def __init__(self, title: str) -> None:
        self.title, self.total, self.pages = title, 0, 0

    def __call__(self, canvas: Canvas, document: BaseDocTemplate) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 8)
        canvas.setFillColor(colors.HexColor("#555555"))
        number = f"page {document.page} of {self.total}" if self.total else f"page {document.page}"
        canvas.drawRightString(A4[0] - MARGIN, 9 * mm, number)
        canvas.drawString(MARGIN, 9 * mm, self.title)
        canvas.restoreState()
        self.pages = document.page


def to_pdf(doc: list[Block], path: Path, base: Path) -> int:
    """Write the PDF (A4, page numbers 'page n of m'); figures are read from ``base``. Returns the page count."""
    title = next((b.text for b in doc if isinstance(b, Heading)), "Study report")
    footer = Footer(title)
    for _ in range(2):  # first pass counts the pages, second writes "page n of m"
        template = SimpleDocTemplate(
            str(path),
            pagesize=A4,
            leftMargin=MARGIN,
            rightMargin=MARGIN,
            topMargin=MARGIN,
            bottomMargin=18 * mm,
            title=title,
            author="moe-harness",
        )
        template.build(story(doc, base), onFirstPage=footer, onLaterPages=footer)
        footer.total = footer.pages
    return footer.total
