"""Number formatting of the report's tables and text ("n/a" for missing or non-finite values); byte counts go
through the project's one formatter (`traces.units`), so the report prints a size as replay does."""

from __future__ import annotations

import math

from traces.units import nbytes


def fmt_bytes(n: float) -> str:
    """Binary prefixes, three significant figures: "9.05 MiB"."""
    return nbytes(n) if math.isfinite(n) else "n/a"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}f}"


def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.3f}"


def fmt_int(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:,.0f}"
