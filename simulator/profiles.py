"""Measured cost profiles: what `moe-sim calibrate` writes and what `--hardware` prices with.

A profile holds, for one GPU and one expert backend, the measured time of one GPU's local expert work as a
function of its per-expert assignment counts (a grouped-GEMM table plus a fitted fixed and per-assignment
term), optionally the non-expert layer work by per-GPU batch and context, and the all-to-all figures.
docs/cost-model.md gives the formulas; simulator/expert_time.py evaluates them. This module only reads, checks
and writes the files.

Every table uses the same fixed grids (GRID_LOG2_EXPERTS x GRID_ROWS), so the Numba pricing kernel can index
them without searching.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from traces.errors import InputError
from traces.writer import make_parent_dir

PROFILE_FORMAT = "moe-trace-profile"
PROFILE_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Expert-work grid: experts with work on the GPU (x = 1 .. 256) by padded rows of work W: the powers of two
# 1 .. 131072 and, inside each octave, 3 x 2^k (3 .. 98304). Grouped GEMMs step with their row tiles, and one
# point per octave cannot see a step inside it (version 1 had only the powers of two).
GRID_LOG2_EXPERTS = tuple(range(9))
GRID_ROWS = tuple(sorted({2**k for k in range(18)} | {3 * 2**k for k in range(16)}))
V1_GRID_LOG2_ROWS = tuple(range(18))
# Non-GEMM expert work (sort, gather, activation, weighting, scatter-add) by assignments on the GPU (a = 1 ..
# 65536).
GRID_LOG2_ASSIGNMENTS = tuple(range(17))
# Non-expert grid: tokens per GPU per step (1 .. 16384) by attention context.
GRID_LOG2_TOKENS = tuple(range(15))
PROFILES_DIR = Path(__file__).resolve().parent.parent / "data" / "profiles"
DEFAULT_BACKEND = "torch-grouped-mm"
BACKENDS = ("torch-grouped-mm", "transformers", "vllm-fused-moe", "sglang-fused-moe")


@dataclass(frozen=True)
class ExpertWork:
    """One GPU's routed-expert time for one expert shape (seconds)."""

    gemm_seconds: np.ndarray  # [len(GRID_LOG2_EXPERTS), len(GRID_ROWS)] both grouped GEMMs, monotone
    tile_rows: int  # per-expert rows are rounded up to a multiple of this before the table lookup
    fixed_seconds: float  # per layer and GPU: launches, offsets, the parts that do not grow with the work
    per_assignment_seconds: float  # permute, activation, weighting and scatter-add, per (token, expert) pair
    residuals: dict[str, float] = field(default_factory=dict)  # on skewed count vectors: relative errors
    measured: np.ndarray | None = None  # the grid as measured, NaN where not (gemm_seconds is filled from it)
    # (counts, seconds of the whole work, seconds of the two GEMMs alone or NaN): skewed vectors, the check's
    # data
    samples: tuple[tuple[tuple[int, ...], float, float], ...] = ()
    # [len(GRID_LOG2_ASSIGNMENTS)] measured non-GEMM work R(a), monotone; when present it is the whole
    # remainder (fixed_seconds and per_assignment_seconds are then 0)
    overhead_seconds: np.ndarray | None = None
    overhead_measured: tuple[tuple[int, float], ...] = ()  # (assignments, seconds) as measured


@dataclass(frozen=True)
class NonExpertWork:
    """Per-layer work outside the routed experts, measured by tokens per GPU (seconds)."""

    context_tokens: tuple[int, ...]  # attention contexts measured
    # [contexts, len(GRID_LOG2_TOKENS)] decode steps: norms, attention, router, shared
    layer_seconds: np.ndarray
    # [contexts, tokens] the same with causal attention over sequences of context
    prefill_layer_seconds: np.ndarray
    head_seconds: np.ndarray  # [len(GRID_LOG2_TOKENS)]: final norm and LM head, once per step
    # [len(GRID_LOG2_TOKENS)] one dense FFN layer, when the model has them
    dense_ffn_seconds: np.ndarray | None
    # the shapes it was measured for (heads, head_dim, vocab, shared and dense FFN sizes...)
    key: dict[str, int]


@dataclass(frozen=True)
class ShapeProfile:
    name: str  # preset or model id the shape came from
    hidden_size: int
    expert_intermediate_size: int
    activation: str  # swiglu or mlp
    expert: ExpertWork
    non_expert: NonExpertWork | None = None

    @property
    def shape_label(self) -> str:
        return f"hidden {self.hidden_size} x expert FFN {self.expert_intermediate_size} {self.activation}"


@dataclass(frozen=True)
class Communication:
    """Scale-up all-to-all: measured (2+ GPUs) or the DeepEP figures the roofline model uses."""

    source: str  # "measured" or "deepep"
    dispatch_bytes_per_s: float | None = None  # effective, per GPU per direction
    combine_bytes_per_s: float | None = None
    latency_s: float | None = None
    points: list[dict[str, float]] = field(default_factory=list)  # measured message sizes and times


@dataclass(frozen=True)
class CostProfile:
    hardware: str  # preset name whose datasheet the GPU matches (h200, h100...)
    backend: str
    gpu: dict[str, Any]  # name, clocks, SMs, memory
    software: dict[str, str]  # torch, CUDA, transformers, driver
    created_at: str
    tool_version: str
    quick: bool
    shapes: tuple[ShapeProfile, ...]
    communication: Communication
    path: str = ""

    @property
    def label(self) -> str:
        return Path(self.path).stem if self.path else f"{self.hardware}-{self.backend}"

    def shape_for(self, hidden: int, ffn: int, activation: str) -> tuple[ShapeProfile, bool]:
        """The measured shape for these expert sizes, and whether it is an exact match (else the nearest one
        by work per row, which expert_time scales)."""
        for s in self.shapes:
            if (s.hidden_size, s.expert_intermediate_size, s.activation) == (hidden, ffn, activation):
                return s, True
        target = math.log(hidden * ffn)
        nearest = min(self.shapes, key=lambda s: (s.activation != activation,
                                                   abs(math.log(s.hidden_size * s.expert_intermediate_size)
                                                       - target)))
        return nearest, False


# ---------------------------------------------------------------------------------------------- reading


def _num(data: dict[str, Any], key: str, where: str, *, positive: bool = False) -> float:
    if key not in data:
        raise InputError(f"{where}: missing field {key}")
    try:
        v = float(data[key])
    except (TypeError, ValueError):
        raise InputError(f"{where}: {key} must be a number, got {data[key]!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise InputError(f"{where}: {key} must be a finite {'positive' if positive else 'non-negative'} "
                         f"number, got {data[key]!r}")
    return v


def _table(data: dict[str, Any], key: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    if key not in data:
        raise InputError(f"{where}: missing field {key}")
    try:
        arr = np.asarray(data[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {key} must be a table of numbers") from None
    if arr.shape != shape:
        raise InputError(f"{where}: {key} must have shape {list(shape)}, got {list(arr.shape)}")
    if not np.isfinite(arr).all() or (arr <= 0).any():
        raise InputError(f"{where}: {key} holds negative, zero or non-finite times")
    return arr


def _require(data: Any, key: str, where: str, kind: type) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise InputError(f"{where}: missing field {key}")
    if not isinstance(data[key], kind):
        raise InputError(f"{where}: {key} must be a {kind.__name__}")
    return data[key]


def _v1_columns(table: np.ndarray, interpolate: bool) -> np.ndarray:
    """A version-1 table (powers of two only) on today's rows grid: the 3 x 2^k columns on the log-log line
    between their neighbours (what version 1 priced there), or NaN for a measured grid (not measured)."""
    out = np.full((table.shape[0], len(GRID_ROWS)), np.nan)
    cols = [GRID_ROWS.index(2**k) for k in V1_GRID_LOG2_ROWS]
    out[:, cols] = table
    if interpolate:
        lw = np.log2(np.asarray(GRID_ROWS, dtype=np.float64))
        for i in range(out.shape[0]):
            out[i] = 2.0 ** np.interp(lw, lw[cols], np.log2(table[i]))
    return out


def _expert(data: Any, where: str, version: int) -> ExpertWork:
    if not isinstance(data, dict):
        raise InputError(f"{where}: missing field expert")
    rows_key, rows_grid = ("grid_log2_rows", V1_GRID_LOG2_ROWS) if version == 1 else ("grid_rows", GRID_ROWS)
    for key, grid in (("grid_log2_experts", GRID_LOG2_EXPERTS), (rows_key, rows_grid)):
        if list(data.get(key, [])) != list(grid):
            raise InputError(f"{where}: {key} must be {list(grid)} (the grid of profile version {version})")
    table = _table(data, "gemm_seconds", (len(GRID_LOG2_EXPERTS), len(rows_grid)), where)
    if (np.diff(table, axis=0) < 0).any() or (np.diff(table, axis=1) < 0).any():
        raise InputError(f"{where}: gemm_seconds must not decrease with experts or rows")
    if version == 1:
        table = _v1_columns(table, interpolate=True)
    tile = _num(data, "tile_rows", where, positive=True)
    if tile != int(tile) or int(tile) & (int(tile) - 1):
        raise InputError(f"{where}: tile_rows must be a power of two, got {data['tile_rows']!r}")
    residuals = data.get("residuals") or {}
    measured = None
    if data.get("measured_gemm_seconds") is not None:
        try:
            measured = np.array([[np.nan if v is None else float(v) for v in row]
                                 for row in data["measured_gemm_seconds"]])
        except (TypeError, ValueError):
            raise InputError(f"{where}: measured_gemm_seconds must be a table of numbers and nulls") from None
        if measured.shape != (len(GRID_LOG2_EXPERTS), len(rows_grid)):
            raise InputError(f"{where}: measured_gemm_seconds must have the shape of gemm_seconds")
        if version == 1:
            measured = _v1_columns(measured, interpolate=False)
    try:
        samples = tuple((tuple(int(c) for c in smp["counts"]), float(smp["seconds"]),
                         float(smp.get("gemm_seconds", math.nan))) for smp in data.get("samples") or [])
        overhead_measured = tuple((int(a), float(t)) for a, t in data.get("overhead_measured") or [])
    except (TypeError, ValueError, KeyError, AttributeError):
        raise InputError(f"{where}: samples must be a list of {{counts, seconds[, gemm_seconds]}} and "
                         "overhead_measured a list of [assignments, seconds]") from None
    overhead = None
    if data.get("overhead_seconds") is not None:
        if list(data.get("grid_log2_assignments", [])) != list(GRID_LOG2_ASSIGNMENTS):
            raise InputError(f"{where}: grid_log2_assignments must be {list(GRID_LOG2_ASSIGNMENTS)}")
        overhead = _table(data, "overhead_seconds", (len(GRID_LOG2_ASSIGNMENTS),), where)
        if (np.diff(overhead) < 0).any():
            raise InputError(f"{where}: overhead_seconds must not decrease with assignments")
    return ExpertWork(table, int(tile), _num(data, "fixed_seconds", where),
                      _num(data, "per_assignment_seconds", where),
                      {str(k): float(v) for k, v in residuals.items()} if isinstance(residuals, dict) else {},
                      measured, samples, overhead, overhead_measured)


def _non_expert(data: Any, where: str) -> NonExpertWork | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InputError(f"{where}: non_expert must be a mapping")
    if list(data.get("grid_log2_tokens", [])) != list(GRID_LOG2_TOKENS):
        raise InputError(f"{where}: grid_log2_tokens must be {list(GRID_LOG2_TOKENS)}")
    contexts = _require(data, "context_tokens", where, list)
    if not contexts or any(not isinstance(c, int) or c < 1 for c in contexts) or sorted(contexts) != contexts:
        raise InputError(f"{where}: context_tokens must be increasing positive integers")
    n = len(GRID_LOG2_TOKENS)
    dense = data.get("dense_ffn_seconds")
    key = _require(data, "key", where, dict)
    return NonExpertWork(
        context_tokens=tuple(contexts),
        layer_seconds=_table(data, "layer_seconds", (len(contexts), n), where),
        prefill_layer_seconds=_table(data, "prefill_layer_seconds", (len(contexts), n), where),
        head_seconds=_table(data, "head_seconds", (n,), where),
        dense_ffn_seconds=None if dense is None else _table(data, "dense_ffn_seconds", (n,), where),
        key={str(k): int(v) for k, v in key.items()},
    )


def _shape(data: Any, where: str, version: int) -> ShapeProfile:
    if not isinstance(data, dict):
        raise InputError(f"{where}: each shape must be a mapping")
    activation = data.get("activation")
    if activation not in ("swiglu", "mlp"):
        raise InputError(f"{where}: activation must be swiglu or mlp, got {activation!r}")
    return ShapeProfile(
        name=str(data.get("name", "")), hidden_size=int(_num(data, "hidden_size", where, positive=True)),
        expert_intermediate_size=int(_num(data, "expert_intermediate_size", where, positive=True)),
        activation=activation, expert=_expert(data.get("expert"), f"{where} expert", version),
        non_expert=_non_expert(data.get("non_expert"), f"{where} non_expert"),
    )


def profile_from_dict(data: Any, source: str) -> CostProfile:
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise InputError(f"{source}: not a moe-trace cost profile (format: {PROFILE_FORMAT} missing)")
    if data.get("version") not in READABLE_VERSIONS:
        raise InputError(f"{source}: unknown profile version {data.get('version')!r} (this moe-trace reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))})")
    for key in ("hardware", "backend", "created_at", "tool_version"):
        if data.get(key) in (None, ""):
            raise InputError(f"{source}: missing field {key}")
        data[key] = str(data[key])  # YAML reads an unquoted date or version as a date or a number
    shapes = _require(data, "shapes", source, list)
    if not shapes:
        raise InputError(f"{source}: shapes is empty")
    comm = data.get("communication") or {"source": "deepep"}
    if not isinstance(comm, dict) or comm.get("source") not in ("measured", "deepep"):
        raise InputError(f"{source}: communication.source must be measured or deepep")
    if comm["source"] == "measured":
        where = f"{source} communication"
        communication = Communication("measured", _num(comm, "dispatch_bytes_per_s", where, positive=True),
                                      _num(comm, "combine_bytes_per_s", where, positive=True),
                                      _num(comm, "latency_s", where), list(comm.get("points") or []))
    else:
        communication = Communication("deepep")
    return CostProfile(
        hardware=data["hardware"].lower(), backend=data["backend"], gpu=dict(data.get("gpu") or {}),
        software={str(k): str(v) for k, v in (data.get("software") or {}).items()},
        created_at=data["created_at"], tool_version=data["tool_version"],
        quick=bool(data.get("quick", False)),
        shapes=tuple(_shape(s, f"{source} shape {i}", data["version"]) for i, s in enumerate(shapes)),
        communication=communication, path=source,
    )


_CACHE: dict[str, CostProfile] = {}


def is_profile_file(path: Path) -> bool:
    """A YAML/JSON file whose top level names the profile format (a plain hardware file does not)."""
    try:
        head = path.read_bytes()[:4096].decode("utf-8", errors="replace")
    except OSError:
        return False
    return re.search(rf"^\s*[\"']?format[\"']?\s*:\s*[\"']?{PROFILE_FORMAT}\b", head, re.M) is not None


def load_profile(path: str | Path) -> CostProfile:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: profile not found")
    st = p.stat()
    key = f"{p.resolve()}:{st.st_mtime_ns}:{st.st_size}"  # a rewritten file is read again
    if key in _CACHE:
        return _CACHE[key]
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot parse profile ({str(exc).splitlines()[0]})") from exc
    prof = profile_from_dict(data, str(p))
    _CACHE[key] = prof
    return prof


def shipped_profile(hardware: str, backend: str = DEFAULT_BACKEND) -> Path | None:
    path = PROFILES_DIR / f"{hardware.lower()}-{backend}.yaml"
    return path if path.exists() else None


def nearest_shipped_profile(backend: str = DEFAULT_BACKEND) -> Path | None:
    """The measured profile other presets are derived from (H200 is the only GPU measured so far)."""
    for hw in ("h200", "h100"):
        p = shipped_profile(hw, backend)
        if p is not None:
            return p
    return None


# ---------------------------------------------------------------------------------------------- writing


def _sample_dict(counts: tuple[int, ...], seconds: float, gemm_seconds: float) -> dict[str, Any]:
    d: dict[str, Any] = {"counts": list(counts), "seconds": float(f"{seconds:.5g}")}
    if math.isfinite(gemm_seconds):
        d["gemm_seconds"] = float(f"{gemm_seconds:.5g}")
    return d


def _expert_dict(e: ExpertWork) -> dict[str, Any]:
    d = {"grid_log2_experts": list(GRID_LOG2_EXPERTS), "grid_rows": list(GRID_ROWS),
         "gemm_seconds": [[float(f"{v:.5g}") for v in row] for row in e.gemm_seconds.tolist()],
         "tile_rows": e.tile_rows, "fixed_seconds": float(f"{e.fixed_seconds:.5g}"),
         "per_assignment_seconds": float(f"{e.per_assignment_seconds:.5g}")}
    if e.overhead_seconds is not None:
        d |= {"grid_log2_assignments": list(GRID_LOG2_ASSIGNMENTS),
              "overhead_seconds": _round(e.overhead_seconds),
              "overhead_measured": [[a, float(f"{t:.5g}")] for a, t in e.overhead_measured]}
    return d | {
        "residuals": {k: float(f"{v:.4g}") for k, v in e.residuals.items()},
        "measured_gemm_seconds": None if e.measured is None else
        [[None if not np.isfinite(v) else float(f"{v:.5g}") for v in row] for row in e.measured.tolist()],
        "samples": [_sample_dict(*smp) for smp in e.samples]}


def _round(a: np.ndarray) -> list[Any]:
    return [float(f"{v:.5g}") for v in a.tolist()] if a.ndim == 1 else [_round(r) for r in a]


def profile_to_dict(p: CostProfile) -> dict[str, Any]:
    shapes = []
    for s in p.shapes:
        d: dict[str, Any] = {"name": s.name, "hidden_size": s.hidden_size,
                             "expert_intermediate_size": s.expert_intermediate_size,
                             "activation": s.activation, "dtype": "bfloat16",
                             "expert": _expert_dict(s.expert)}
        if s.non_expert is not None:
            ne = s.non_expert
            d["non_expert"] = {"grid_log2_tokens": list(GRID_LOG2_TOKENS),
                               "context_tokens": list(ne.context_tokens),
                               "layer_seconds": _round(ne.layer_seconds),
                               "prefill_layer_seconds": _round(ne.prefill_layer_seconds),
                               "head_seconds": _round(ne.head_seconds),
                               "dense_ffn_seconds": None if ne.dense_ffn_seconds is None
                               else _round(ne.dense_ffn_seconds), "key": dict(ne.key)}
        shapes.append(d)
    comm = dataclasses.asdict(p.communication)
    if p.communication.source == "deepep":
        comm = {"source": "deepep",
                "note": "one GPU: all-to-all priced with DeepEP's published intranode figures"}
    return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "hardware": p.hardware,
            "backend": p.backend, "gpu": p.gpu, "software": {k: str(v) for k, v in p.software.items()},
            "created_at": p.created_at,
            "tool_version": p.tool_version, "quick": p.quick, "shapes": shapes, "communication": comm}


def write_profile(p: CostProfile, path: Path) -> None:
    """Write atomically: a temporary file beside the target, renamed only once complete."""
    make_parent_dir(path)
    text = yaml.safe_dump(profile_to_dict(p), sort_keys=False, width=200, default_flow_style=None)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as an ordinary file would be, not mkstemp's 0600
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
