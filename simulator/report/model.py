"""The report as plain data: sections of paragraphs, tables and figures. Renderers turn it into HTML or
Markdown.

A section renders in this order: paragraphs, lead tables, bullets, tables, details, figures.

Nothing here computes or draws; build.py fills a Report, render.py writes it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """A table of already formatted cells. `numeric` marks columns to right-align."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    numeric: list[bool] | None = None
    legend: str = ""  # what the columns mean, shown under the table

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.caption!r}: row {row} has {len(row)} cells for "
                                 f"{len(self.columns)} columns")


@dataclass
class Figure:
    """One plot, drawn already: PNG bytes with its pixel size, and the text that explains it."""

    key: str  # stable identifier, also the PNG's file name in Markdown output
    title: str
    caption: str
    png: bytes
    width: int
    height: int


@dataclass
class Details:
    """A list folded under a one-line summary (HTML <details>; Markdown viewers that know the tag fold it
    too)."""

    summary: str
    items: list[str]


@dataclass
class Section:
    key: str  # anchor id in HTML
    title: str
    paragraphs: list[str] = field(default_factory=list)  # plain text (renderers escape it)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)  # points shown after the paragraphs and the lead tables
    # tables shown right after the paragraphs, before the bullets
    lead: list[Table] = field(default_factory=list)
    details: list[Details] = field(default_factory=list)  # folded lists, after the tables


@dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section]
    data: dict[str, Any]  # the numbers behind the report, JSON-ready (for --json and for tests)

    def section(self, key: str) -> Section:
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(key)

    @property
    def figures(self) -> list[Figure]:
        return [f for s in self.sections for f in s.figures]
