"""Renderers: Report -> one self-contained HTML page, or Markdown with PNG files beside it; and the atomic
write.

The HTML page embeds every plot as a base64 PNG and its CSS inline, loads nothing from the network and runs no
script, so it opens anywhere (and in a browser with no console errors).
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
from pathlib import Path

from simulator.report.model import Figure, Report, Section, Table
from traces.errors import InputError
from traces.writer import make_parent_dir

HTML_SUFFIXES = (".html", ".htm")
MARKDOWN_SUFFIXES = (".md", ".markdown")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; line-height: 1.45; }
main { max-width: 1200px; margin: 0 auto; padding: 1.5rem 2rem 4rem; background: #fff; }
h1 { margin-bottom: 0.2rem; } .subtitle { color: #5a6372; margin-top: 0; }
h2 { border-bottom: 2px solid #e3e6eb; padding-bottom: 0.2rem; margin-top: 2.4rem; }
nav ol { columns: 2; padding-left: 1.2rem; } nav a { text-decoration: none; }
.table-wrap { overflow-x: auto; margin: 0.8rem 0 1.2rem; }
table { border-collapse: collapse; font-size: 0.85rem; }
caption { text-align: left; font-weight: 600; padding: 0.3rem 0; }
th, td { border: 1px solid #d8dce3; padding: 0.25rem 0.55rem; }
th { background: #eef1f5; text-align: left; } \
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0 1.6rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eceef2; }
figcaption { color: #4a5261; font-size: 0.88rem; } figcaption b { color: #1d2330; }
.bullets li { margin: 0.2rem 0; }
details { margin: 0.4rem 0 1rem; } details summary { cursor: pointer; color: #4a5261; }
.legend { color: #4a5261; font-size: 0.82rem; margin: 0.3rem 0 0; max-width: 70rem; }
"""


# ------------------------------------------------------------------------------------------------------- HTML


def _html_table(table: Table) -> str:
    numeric = table.numeric or [False] * len(table.columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    rows = []
    for row in table.rows:
        cells = "".join(
            f'<td class="num">{html.escape(cell)}</td>' if num else f"<td>{html.escape(cell)}</td>"
            for cell, num in zip(row, numeric, strict=True)
        )
        rows.append(f"<tr>{cells}</tr>")
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    table_html = f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    legend = f'<p class="legend">{html.escape(table.legend)}</p>' if table.legend else ""
    # wide tables scroll inside the page, not the page
    return f'<div class="table-wrap">{table_html}{legend}</div>'


def _html_figure(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure id="fig-{html.escape(fig.key)}">'
        f'<img src="data:image/png;base64,{data}" width="{fig.width}" height="{fig.height}" '
        f'alt="{html.escape(fig.title)}">'
        f"<figcaption><b>{html.escape(fig.title)}.</b> {html.escape(fig.caption)}</figcaption></figure>"
    )


def _html_section(section: Section) -> str:
    parts = [f'<section id="{html.escape(section.key)}"><h2>{html.escape(section.title)}</h2>']
    parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
    parts += [_html_table(t) for t in section.lead]
    if section.bullets:
        parts.append('<ul class="bullets">' + "".join(f"<li>{html.escape(b)}</li>" for b in section.bullets)
                     + "</ul>")
    parts += [_html_table(t) for t in section.tables]
    parts += [f"<details><summary>{html.escape(d.summary)}</summary><ul>"
              + "".join(f"<li>{html.escape(item)}</li>" for item in d.items) + "</ul></details>"
              for d in section.details]
    parts += [_html_figure(f) for f in section.figures]
    parts.append("</section>")
    return "\n".join(parts)


def render_html(report: Report) -> str:
    """One self-contained HTML page: inline CSS, plots as data-URI PNGs, no scripts, no network."""
    toc = "".join(f'<li><a href="#{html.escape(s.key)}">{html.escape(s.title)}</a></li>'
                  for s in report.sections)
    body = "\n".join(_html_section(s) for s in report.sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request: the page fetches nothing
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main><h1>{html.escape(report.title)}</h1>"
        f'<p class="subtitle">{html.escape(report.subtitle)}</p>'
        f"<nav><ol>{toc}</ol></nav>\n{body}\n</main></body></html>\n"
    )


# --------------------------------------------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    numeric = table.numeric or [False] * len(table.columns)
    lines = []
    if table.caption:
        lines.append(f"**{_md_escape(table.caption)}**\n")
    lines.append("| " + " | ".join(_md_escape(c) for c in table.columns) + " |")
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in table.rows]
    if table.legend:
        lines += ["", f"_{_md_escape(table.legend)}_"]
    return "\n".join(lines)


def render_markdown(report: Report, image_dir: str | None = None) -> str:
    """Markdown text. Plots link to `<image_dir>/<key>.png` (write them with figure_files), or, with image_dir
    None, are embedded as data URIs (one file, but not every Markdown viewer shows those)."""
    out = [f"# {report.title}", "", f"_{report.subtitle}_", ""]
    out += [f"{i}. [{s.title}](#{s.key})" for i, s in enumerate(report.sections, 1)]
    for section in report.sections:
        out += ["", f'<a id="{section.key}"></a>', f"## {section.title}", ""]
        for p in section.paragraphs:
            out += [p, ""]
        for t in section.lead:
            out += [_md_table(t), ""]
        if section.bullets:
            out += [f"- {b}" for b in section.bullets] + [""]
        for t in section.tables:
            out += [_md_table(t), ""]
        for d in section.details:
            out += [f"<details><summary>{html.escape(d.summary)}</summary>", "",
                    *(f"- {_md_escape(item)}" for item in d.items), "", "</details>", ""]
        for fig in section.figures:
            if image_dir is None:
                src = "data:image/png;base64," + base64.b64encode(fig.png).decode("ascii")
            else:
                src = f"{image_dir}/{fig.key}.png"
            out += [f"![{fig.title}]({src})", "", f"*{fig.title}.* {fig.caption}", ""]
    return "\n".join(out).rstrip() + "\n"


def figure_files(report: Report) -> dict[str, bytes]:
    """File name -> PNG bytes for every plot (the files render_markdown links to)."""
    return {f"{fig.key}.png": fig.png for fig in report.figures}


# ------------------------------------------------------------------------------------------------------ write


def output_format(path: Path) -> str:
    """'html' or 'markdown' by the output's extension."""
    suffix = path.suffix.lower()
    if suffix in HTML_SUFFIXES:
        return "html"
    if suffix in MARKDOWN_SUFFIXES:
        return "markdown"
    raise InputError(f"{path}: unsupported report extension {suffix or '(none)'!r}; use .html or .md")


def markdown_image_dir(path: Path) -> Path:
    """Where a Markdown report's PNG files go: `<stem>_files/` beside it."""
    return path.with_name(path.stem + "_files")


def check_output(path: Path, force: bool) -> None:
    """Fail before any work if the report could not be written or would overwrite something without
    --force."""
    fmt = output_format(path)
    make_parent_dir(path)
    targets = [path] + ([markdown_image_dir(path)] if fmt == "markdown" else [])
    for target in targets:
        if target.exists() and not force:
            raise InputError(f"{target}: already exists (pass --force to overwrite)")
        if target.is_dir() and target == path:
            raise InputError(f"{path}: is a directory")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_report(report: Report, path: str | Path, *, force: bool = False) -> list[Path]:
    """Write the report by the extension: .html (one self-contained file) or .md (plus `<stem>_files/*.png`).

    Every file is written under a temporary name and renamed into place; the Markdown file goes last, so its
    name appears only once all its images are there. Returns the paths written.
    """
    path = Path(path)
    check_output(path, force)
    if output_format(path) == "html":
        _atomic_write_text(path, render_html(report))
        return [path]
    image_dir = markdown_image_dir(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{image_dir.name}.", dir=path.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        for name, png in figure_files(report).items():
            (staging / name).write_bytes(png)
        if image_dir.exists():
            shutil.rmtree(image_dir) if image_dir.is_dir() else image_dir.unlink()
        os.replace(staging, image_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _atomic_write_text(path, render_markdown(report, image_dir=image_dir.name))
    return [path, *sorted(image_dir.iterdir())]
