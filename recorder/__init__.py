"""Recorder: capture MoE routing from transformers models (`moe-rec record` and the MoEProfiler API).

Imports are lazy so that `import recorder` (and `moe-rec --help`) do not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MoEProfiler", "RecordConfig", "discover_routers", "record"]


def __getattr__(name: str) -> Any:
    if name == "MoEProfiler":
        from recorder.profiler import MoEProfiler

        return MoEProfiler
    if name == "RecordConfig":
        from recorder.config import RecordConfig

        return RecordConfig
    if name == "record":
        from recorder.record import record

        return record
    if name == "discover_routers":
        from recorder.routers import discover_routers

        return discover_routers
    raise AttributeError(f"module 'recorder' has no attribute {name!r}")
