"""Calibration: time one GPU's expert work (grid and skewed counts), its non-expert work and, with 2+ GPUs,
the all-to-all, then build the expert models (expert_time.fit_measured_works) into a CostProfile. Needs
CUDA."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial

import numpy as np
import torch

from simulator import expert_time as X
from simulator.calibrate.expert_work import ExpertShape, assignments_from_counts, make_backend
from simulator.calibrate.non_expert import NonExpertLayer, NonExpertShapes
from simulator.calibrate.timing import CpuTimer, GapFreeTimer, make_timer
from simulator.cost_model import non_expert_key
from simulator.profiles import (
    GRID_LOG2_ASSIGNMENTS,
    GRID_LOG2_EXPERTS,
    GRID_LOG2_TOKENS,
    GRID_ROWS,
    Communication,
    CostProfile,
    NonExpertWork,
    ShapeProfile,
)
from traces.errors import InputError
from traces.schema import TraceMetadata, current_tool_version

MAX_ROWS_PER_EXPERT_LOG2 = 14  # 16k tokens per expert, the top of the grid the issue asks for
GPU_NAMES = {"H200": "h200", "H100": "h100", "A100": "a100", "B200": "b200", "MI300X": "mi300x"}
Tick = Callable[[int], None]


@dataclass(frozen=True)
class Plan:
    """How much to measure: --quick thins every grid and repeats less."""

    quick: bool

    @property
    def repeats(self) -> int:
        return 3 if self.quick else 7

    @property
    def skewed_vectors(self) -> int:
        return 16 if self.quick else 48

    @property
    def overhead_log2_assignments(self) -> tuple[int, ...]:
        """Where R(a) is measured: every power of two of the grid, every other one with --quick."""
        return tuple(k for k in GRID_LOG2_ASSIGNMENTS if k % (2 if self.quick else 1) == 0 or
                     k == GRID_LOG2_ASSIGNMENTS[-1])

    @property
    def contexts(self) -> tuple[int, ...]:
        return (2048,) if self.quick else (512, 2048, 8192)

    @property
    def token_step(self) -> int:
        return 2 if self.quick else 1


def require_device(device: str) -> torch.device:
    """The device to calibrate: CUDA (the point of calibrating), or the CPU to test the pipeline end to
    end."""
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise InputError(f"--device must be cuda or cpu, got {device!r}")
    if not torch.cuda.is_available():
        raise InputError(f"calibrate needs a CUDA GPU: torch {torch.__version__} sees none "
                         f"({'built without CUDA' if torch.version.cuda is None else 'no device visible'})")
    return torch.device("cuda", torch.cuda.current_device())


def detect_hardware(name: str) -> str:
    for key, preset in GPU_NAMES.items():
        if key in name.upper().replace(" ", ""):
            return preset
    raise InputError(f"calibrate: GPU {name!r} matches no hardware preset; name the nearest with --hardware")


def gpu_facts(device: torch.device) -> tuple[dict[str, object], dict[str, str]]:
    if device.type == "cpu":
        import platform

        return ({"name": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                         "threads)",
                 "device": "cpu"}, {"torch": str(torch.__version__)})
    props = torch.cuda.get_device_properties(device)
    gpu: dict[str, object] = {"name": props.name, "sm_count": props.multi_processor_count,
                              "memory_bytes": int(props.total_memory)}
    software = {"torch": str(torch.__version__), "cuda": str(torch.version.cuda)}
    try:
        import transformers

        software["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,clocks.sm",
                            "--format=csv,noheader,nounits", f"--id={device.index or 0}"],
                           capture_output=True, text=True, timeout=20, check=True).stdout.strip().split(", ")
        software["driver"] = q[0]
        gpu |= {"max_sm_clock_mhz": float(q[1]), "max_memory_clock_mhz": float(q[2]),
                "sm_clock_mhz": float(q[3])}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        pass  # clocks are informative only
    return gpu, software


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gemm_points(num_experts: int, plan: Plan) -> list[tuple[int, int]]:
    """(i, j) grid cells to measure: x = 2^i experts up to the model's count, W = GRID_ROWS[j] rows in all, W
    / x rows each (a whole number, at most 16k). --quick keeps every other power of two and drops the 3 x 2^k
    points."""
    top_x = int(np.log2(_pow2_ceil(num_experts)))
    out = []
    for i in GRID_LOG2_EXPERTS:
        if i > top_x or (plan.quick and i % 2 and i != top_x):
            continue
        for j, w in enumerate(GRID_ROWS):
            per_expert, rest = divmod(w, 2**i)
            if rest or not 1 <= per_expert <= 2**MAX_ROWS_PER_EXPERT_LOG2:
                continue
            if plan.quick and (w & (w - 1) or (int(np.log2(w)) - i) % 2):
                continue
            out.append((i, j))
    return out


def skewed_counts(num_experts: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Count vectors like real steps: a GPU's local experts (1 .. all), assignments log-uniform up to 32k,
    shares drawn from Dirichlet(alpha) with alpha from 0.2 (a few hot experts) to 5 (nearly even)."""
    out = []
    top = int(np.log2(_pow2_ceil(num_experts)))
    for _ in range(n):
        local = int(2 ** rng.integers(0, top + 1))
        a = int(2 ** rng.uniform(0, 15))
        p = rng.dirichlet(np.full(local, float(rng.choice([0.2, 0.5, 1.0, 5.0]))))
        out.append(rng.multinomial(a, p))
    return out


def measure_expert(shape: ExpertShape, num_experts: int, backend_name: str, timer: GapFreeTimer | CpuTimer,
                   plan: Plan, tick: Tick, rng: np.random.Generator
                   ) -> tuple[np.ndarray, list[X.Sample], list[tuple[int, float]]]:
    """The grid of GEMM times (NaN where not measured), the skewed vectors and the R points of one shape."""
    device = timer.device
    backend = make_backend(backend_name, shape, _pow2_ceil(num_experts), device)
    table = np.full((len(GRID_LOG2_EXPERTS), len(GRID_ROWS)), np.nan)
    points = gemm_points(num_experts, plan)
    for i in sorted({p[0] for p in points}):
        cells = [j for (ii, j) in points if ii == i]
        items = []
        local = backend.with_experts(2**i)  # as many groups as experts with work
        for j in cells:
            counts = np.zeros(local.num_experts, dtype=np.int64)
            counts[: 2**i] = GRID_ROWS[j] // 2**i
            items.append(local.gemms_only(assignments_from_counts(counts, shape.hidden_size, device, rng)))
        table[i, cells] = timer.time(items, repeats=plan.repeats)
        tick(len(cells))
        del items
    overhead = []
    vectors = overhead_counts(num_experts, plan, rng)
    for b0 in range(0, len(vectors), 6):
        batch = vectors[b0: b0 + 6]
        whole, gemms = _time_whole_and_gemms(backend, batch, shape, timer, plan, rng)
        overhead += [(int(c.sum()), float(w - g)) for c, w, g in zip(batch, whole, gemms, strict=True)]
        tick(len(batch))
    samples = []
    vectors = skewed_counts(num_experts, plan.skewed_vectors, rng)
    for b0 in range(0, len(vectors), 6):
        whole, gemms = _time_whole_and_gemms(backend, vectors[b0: b0 + 6], shape, timer, plan, rng)
        samples += [X.Sample(c, float(w), float(g))
                    for c, w, g in zip(vectors[b0: b0 + 6], whole, gemms, strict=True)]
        tick(len(whole))
    return table, samples, overhead


def overhead_counts(num_experts: int, plan: Plan, rng: np.random.Generator) -> list[np.ndarray]:
    """Count vectors for R(a) at each measured a = 2^k: all on one expert, spread evenly, and Dirichlet-skewed
    over the local experts (R should not depend on how the rows split; the median of the three is kept)."""
    out = []
    for k in plan.overhead_log2_assignments:
        a = 2**k
        one = np.zeros(num_experts, dtype=np.int64)
        one[0] = a
        even = np.bincount(np.arange(a) % num_experts, minlength=num_experts).astype(np.int64)
        out += [one, even, rng.multinomial(a, rng.dirichlet(np.full(num_experts, 0.5)))]
    return out


def _time_whole_and_gemms(backend, vectors: list[np.ndarray], shape: ExpertShape,
                          timer: GapFreeTimer | CpuTimer, plan: Plan,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Seconds of the whole local work and of its two GEMMs alone, for each count vector, on a backend with
    the vector's local experts. Each vector's two items run next to each other: R is their difference, a
    small one of two large times for big experts, so both must see the same clocks (queued 6 items apart,
    Mixtral's differences at 16k assignments scattered from -0.5 to +0.9 ms)."""
    items: list[Callable[[], object]] = []
    for c in vectors:
        local = backend.with_experts(c.size)
        w = assignments_from_counts(np.pad(c, (0, local.num_experts - c.size)), shape.hidden_size,
                                    timer.device, rng, top_k=8)
        items += [partial(local.run, w), local.gemms_only(w)]
    secs = timer.time(items, repeats=plan.repeats)
    return secs[0::2], secs[1::2]


def _fill_curve(values: np.ndarray) -> np.ndarray:
    """Missing grid points (--quick) interpolated in log-log between measured ones; then made
    non-decreasing."""
    ok = np.flatnonzero(np.isfinite(values))
    out = 2 ** np.interp(np.arange(values.size), ok, np.log2(values[ok]))
    return np.maximum.accumulate(out)


def measure_non_expert(meta: TraceMetadata, timer: GapFreeTimer | CpuTimer, plan: Plan,
                       tick: Tick) -> NonExpertWork:
    s = NonExpertShapes.from_metadata(meta)
    layer = NonExpertLayer(s, timer.device)
    n = len(GRID_LOG2_TOKENS)
    grid = [j for j in GRID_LOG2_TOKENS if j % plan.token_step == 0 or j == GRID_LOG2_TOKENS[-1]]
    layer_s = np.full((2, len(plan.contexts), n), np.nan)  # decode, prefill
    for c, context in enumerate(plan.contexts):
        for j in grid:
            for p, prefill in enumerate((False, True)):
                body, attention, extra = layer.layer_items(2**j, context, prefill)
                t = timer.time([body, attention], repeats=plan.repeats)
                layer_s[p, c, j] = t[0] + extra * t[1]
            tick(1)
    head = np.full(n, np.nan)
    dense = np.full(n, np.nan)
    for j in grid:
        items = [f for f in (layer.head_item(2**j), layer.dense_item(2**j)) if f is not None]
        if items:
            t = timer.time(items, repeats=plan.repeats)
            head[j] = t[0] if layer.lm_head is not None else np.nan
            if layer.dense is not None:
                dense[j] = t[-1]
        tick(1)
    head_s = _fill_curve(head) if np.isfinite(head).any() else np.full(n, 1e-9)
    return NonExpertWork(plan.contexts, np.stack([_fill_curve(r) for r in layer_s[0]]),
                         np.stack([_fill_curve(r) for r in layer_s[1]]), head_s,
                         _fill_curve(dense) if np.isfinite(dense).any() else None, dict(non_expert_key(meta)))


def work_units(metas: list[tuple[str, TraceMetadata]], plan: Plan) -> int:
    """Progress-bar total: GEMM cells + skewed vectors + non-expert points per shape."""
    tokens = len([j for j in GRID_LOG2_TOKENS if j % plan.token_step == 0 or j == GRID_LOG2_TOKENS[-1]])
    return sum(len(gemm_points(m.num_experts, plan)) + plan.skewed_vectors
               + 3 * len(plan.overhead_log2_assignments)
               + tokens * (len(plan.contexts) + 1) for _, m in metas)


def calibrate(metas: list[tuple[str, TraceMetadata]], *, backend: str, quick: bool, hardware: str | None,
              communication: Communication | None, tick: Tick, seed: int = 0,
              device: str = "cuda") -> CostProfile:
    """Measure every shape in metas on the device and return the profile (not yet written)."""
    dev = require_device(device)
    if dev.type == "cpu" and hardware is None:
        raise InputError("calibrate --device cpu: name the hardware preset the profile stands for with "
                         "--hardware")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    plan = Plan(quick)
    timer = make_timer(dev)
    gpu, software = gpu_facts(dev)
    shapes: list[ExpertShape] = []
    measured: list[tuple[np.ndarray, list[X.Sample], list[tuple[int, float]]]] = []
    non_expert: list[NonExpertWork] = []
    seen = set()
    with torch.inference_mode():
        for name, meta in metas:
            key = (meta.hidden_size, meta.expert_intermediate_size, meta.expert_activation)
            if key in seen:
                continue
            seen.add(key)
            shape = ExpertShape(name, meta.hidden_size, meta.expert_intermediate_size, meta.expert_activation)
            measured.append(measure_expert(shape, meta.num_experts, backend, timer, plan, tick, rng))
            non_expert.append(measure_non_expert(meta, timer, plan, tick))
            shapes.append(shape)
            torch.cuda.empty_cache()
    works = X.fit_measured_works(measured)
    for work, (table, _, _) in zip(works, measured, strict=True):
        work.residuals["grid_points_measured"] = float(np.isfinite(table).sum())
    return CostProfile(
        hardware=hardware or detect_hardware(str(gpu["name"])), backend=backend, gpu=gpu, software=software,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tool_version=current_tool_version(), quick=quick,
        shapes=tuple(ShapeProfile(sh.name, sh.hidden_size, sh.ffn_size, sh.activation, w, ne)
                     for sh, w, ne in zip(shapes, works, non_expert, strict=True)),
        communication=communication or Communication("deepep"),
    )


def refit_profile(profile: CostProfile) -> CostProfile:
    """The profile's expert models fitted again from the measurements it stores, under this version's model
    (no GPU needed); what was measured, and when, is kept."""
    try:
        works = X.fit_measured_works([X.refit_work(s.expert) for s in profile.shapes])
    except ValueError as exc:
        raise InputError(f"{profile.path}: cannot re-fit: {exc}") from None
    for work, old in zip(works, profile.shapes, strict=True):
        if "grid_points_measured" in old.expert.residuals:
            work.residuals["grid_points_measured"] = old.expert.residuals["grid_points_measured"]
    return dataclasses.replace(profile, tool_version=current_tool_version(),
                               shapes=tuple(dataclasses.replace(s, expert=w)
                                            for s, w in zip(profile.shapes, works, strict=True)))
