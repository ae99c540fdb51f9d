"""The document as Markdown: tables through tabulate's pipe format, figures as image links with captions."""

from __future__ import annotations

from tabulate import tabulate

from harness.report.blocks import Block, Bullets, Heading, Image, Para, Table


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
