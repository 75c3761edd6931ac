"""The capacity-planning report: build_report (results -> Report data) and the HTML / Markdown renderers."""

from simulator.report.build import ReportInputs, build_report
from simulator.report.model import Figure, Report, Section, Table
from simulator.report.render import render_html, render_markdown, write_report

__all__ = [
    "Figure",
    "Report",
    "ReportInputs",
    "Section",
    "Table",
    "build_report",
    "render_html",
    "render_markdown",
    "write_report",
]
