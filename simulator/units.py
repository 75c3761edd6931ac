"""The simulator's tables format numbers with the project's one formatter, `traces.units` (conventions
there)."""

from traces.units import nbytes, seconds, share, si, sig

__all__ = ["nbytes", "seconds", "share", "si", "sig"]
