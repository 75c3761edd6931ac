"""The one number formatter of every printed table and summary (moe-sim, moe-rec, the report).

Convention: three significant figures. Byte counts (sizes, memory, traffic) use binary prefixes ("9.05 MiB",
"74.5 GiB"); rates and counts use SI prefixes as datasheets do ("450 GB/s", "989 TFLOP/s", "2.09k"); times use
s/ms/us/ns; shares are percentages. It lives in traces/, the layer both the recorder and the simulator import.
"""

from __future__ import annotations

import math

# (prefix, scale), largest first; values under the smallest scale keep it ("0.5 ns" rather than "500 ps")
_LARGE = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0))
_SMALL = (("", 1.0), ("m", 1e-3), ("u", 1e-6), ("n", 1e-9))
_BINARY = (("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40), ("PiB", 1 << 50))


def sig(x: float, digits: int = 3) -> str:
    """x to `digits` significant figures in plain notation: 0.000316 -> "0.000316", 12.06 -> "12.1", 1234 ->
    "1234"."""
    if not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    exponent = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - exponent)
    rounded = round(x, decimals)
    # 9.996 -> 10.0 needs one decimal less
    if rounded != 0 and math.floor(math.log10(abs(rounded))) > exponent:
        decimals = max(0, decimals - 1)
    return f"{rounded:.{decimals}f}"


def si(x: float, unit: str = "", digits: int = 3) -> str:
    """x with an SI prefix so that the mantissa is in [1, 1000), to `digits` significant figures.

    si(1.21e-5, "s") -> "12.1 us"; si(4.5e11, "B/s") -> "450 GB/s"; si(2094) -> "2.09k"; si(0) -> "0" (plus
    unit).
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


def nbytes(x: float, digits: int = 3) -> str:
    """A byte count with a binary prefix, mantissa under 1024: 1000 -> "1000 B", 202_240 -> "198 KiB",
    9.49e6 -> "9.05 MiB", 80e9 -> "74.5 GiB"."""
    if not math.isfinite(x):
        return "-"
    for unit, scale in _BINARY:
        text = sig(x / scale, digits)
        # on the rounded mantissa: 1023.9 KiB is "1.00 MiB"
        if abs(float(text)) < 1024 or unit == _BINARY[-1][0]:
            return f"{text} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def seconds(x: float) -> str:
    """Time: "12.1 us", "3.40 ms", "1.25 s", "3600 s" (no kilo-seconds)."""
    return f"{sig(x)} s" if math.isfinite(x) and abs(x) >= 1 else si(x, "s")


def share(x: float) -> str:
    """A fraction as a percentage to three significant figures: 0.875 -> "87.5%", 0.00312 -> "0.312%"; shares
    under 0.01% (e.g. a tiny model's weights against HBM) print as "<0.01%"."""
    if not math.isfinite(x):
        return "-"
    return "<0.01%" if 0 < x < 1e-4 else f"{sig(100 * x)}%"
