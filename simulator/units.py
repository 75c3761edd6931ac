"""Number formatting for the simulator's printed tables: three significant figures and an SI prefix everywhere, so
that every column reads the same way ("12.1 us", "9.49 MB", "2.09k", "87.5%")."""

from __future__ import annotations

import math

# (prefix, scale), largest first; values under the smallest scale keep it ("0.5 ns" rather than "500 ps")
_LARGE = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0))
_SMALL = (("", 1.0), ("m", 1e-3), ("u", 1e-6), ("n", 1e-9))


def sig(x: float, digits: int = 3) -> str:
    """x to `digits` significant figures in plain notation: 0.000316 -> "0.000316", 12.06 -> "12.1", 1234 -> "1234"."""
    if not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    exponent = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - exponent)
    rounded = round(x, decimals)
    if rounded != 0 and math.floor(math.log10(abs(rounded))) > exponent:  # 9.996 -> 10.0 needs one decimal less
        decimals = max(0, decimals - 1)
    return f"{rounded:.{decimals}f}"


def si(x: float, unit: str = "", digits: int = 3) -> str:
    """x with an SI prefix so that the mantissa is in [1, 1000), to `digits` significant figures.

    si(1.21e-5, "s") -> "12.1 us"; si(9.49e6, "B") -> "9.49 MB"; si(2094) -> "2.09k"; si(0) -> "0" (plus unit).
    """
    sep = " " if unit else ""
    if not math.isfinite(x):
        return "-"
    if x == 0:
        return f"0{sep}{unit}"
    scales = _LARGE if abs(x) >= 1 else _SMALL
    for prefix, scale in scales:
        # pick the prefix on the rounded mantissa, so 999.7 becomes "1.00k" rather than "1000"
        if abs(float(f"{x / scale:.{digits}g}")) >= 1 or scale == scales[-1][1]:
            return f"{sig(x / scale, digits)}{sep}{prefix}{unit}"
    return f"{sig(x, digits)}{sep}{unit}"  # pragma: no cover (the loop always returns)


def seconds(x: float) -> str:
    """Time: "12.1 us", "3.40 ms", "1.25 s", "3600 s" (no kilo-seconds)."""
    return f"{sig(x)} s" if math.isfinite(x) and abs(x) >= 1 else si(x, "s")


def nbytes(x: float) -> str:
    return si(x, "B")


def share(x: float) -> str:
    """A fraction as a percentage to three significant figures: 0.875 -> "87.5%", 0.00312 -> "0.312%"; shares under
    0.01% (e.g. a tiny model's weights against HBM) print as "<0.01%"."""
    if not math.isfinite(x):
        return "-"
    return "<0.01%" if 0 < x < 1e-4 else f"{sig(100 * x)}%"
