"""Plain-text tables for the command lines: one compact style, rendered to a string (`render_*(result) ->
str`).

Rich markup in cells ([red]...[/red]) shows as colour only when `color` is set (a terminal); otherwise it is
dropped.
"""

from __future__ import annotations

import io
import os
import shutil

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

DEFAULT_WIDTH = 120  # columns when stdout is not a terminal and COLUMNS is not set


def table(title: str, columns: list[tuple[str, str]], legend: str | None = None) -> Table:
    """A compact table: (header, justify) columns, no outer edge, one space of padding, the legend under
    it."""
    out = Table(title=title, title_style="bold", caption=legend, caption_justify="left", box=box.SIMPLE_HEAD,
                show_edge=False, padding=(0, 1))
    for header, justify in columns:
        out.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    return out


def output_width() -> int:
    """The terminal's width; DEFAULT_WIDTH when stdout is a pipe or a file and COLUMNS is not set."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    if os.isatty(1):
        return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    return DEFAULT_WIDTH


def to_text(*items: RenderableType, width: int | None = None, color: bool = False) -> str:
    """Render tables and markup strings one after another, as they would print."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width or output_width(), force_terminal=color, no_color=not color,
                      color_system="standard" if color else None, soft_wrap=False)
    for item in items:
        console.print(item)
    return buffer.getvalue()
