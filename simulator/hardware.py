"""Hardware the simulator prices a replay on: one GPU spec and a cluster layout (GPUs, GPUs per node).

Every constant below is quoted once, with its source; docs/cost-model.md explains how each is used.
Bandwidths are per GPU and per direction. Custom hardware comes from a YAML or JSON file with the same field
names (`load_hardware`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traces.errors import InputError

GB = 1e9
TB = 1e12
US = 1e-6

# Latencies are not in the datasheets: these are stated assumptions (typical one-hop NVLink and
# InfiniBand/RoCE message latencies), applied once per dispatch and once per combine per layer. Override them
# in a hardware file.
ASSUMED_SCALE_UP_LATENCY = 3 * US
ASSUMED_SCALE_OUT_LATENCY = 10 * US
# One 400 Gb/s NIC per GPU is about 50 GB/s per direction (ConnectX-7; 8 per 8-GPU node in MLPerf Inference
# v6.0 B200 system descriptions).
NIC_400G_BANDWIDTH = 50 * GB


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator. Peak figures; the cost model applies measured efficiencies on top
    (docs/cost-model.md)."""

    name: str
    bf16_flops: float  # dense BF16 FLOP/s (no sparsity)
    hbm_bytes: float  # HBM capacity, bytes
    hbm_bandwidth: float  # HBM bandwidth, bytes/s
    scale_up_bandwidth: float  # intra-node link (NVLink / Infinity Fabric) per GPU per direction, bytes/s
    scale_out_bandwidth: float  # inter-node network (NIC) per GPU per direction, bytes/s
    scale_up_latency: float = ASSUMED_SCALE_UP_LATENCY  # seconds per all-to-all phase inside a node
    scale_out_latency: float = ASSUMED_SCALE_OUT_LATENCY  # seconds per all-to-all phase across nodes
    price_per_gpu_hour: float | None = None  # optional, for cost-aware comparisons
    # Measured cost profile (simulator/profiles.py) that prices expert and non-expert work; None: roofline
    # only. A profile measured on another GPU is moved to this one by datasheet ratios (expert_time.py).
    profile: str | None = None

    def __post_init__(self) -> None:
        for f in ("bf16_flops", "hbm_bytes", "hbm_bandwidth", "scale_up_bandwidth", "scale_out_bandwidth"):
            if not getattr(self, f) > 0:
                raise InputError(f"hardware {self.name}: {f} must be positive, got {getattr(self, f)}")
        for f in ("scale_up_latency", "scale_out_latency"):
            if getattr(self, f) < 0:
                raise InputError(f"hardware {self.name}: {f} must not be negative")

    @classmethod
    def from_name(cls, name: str) -> GpuSpec:
        key = name.strip().lower()
        if key not in PRESETS:
            raise InputError(f"--hardware: unknown GPU {name!r}; presets are {', '.join(PRESETS)} (or give a "
                             "YAML/JSON file)")
        return PRESETS[key]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> GpuSpec:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InputError(f"{source}: unknown hardware field(s) {', '.join(unknown)}; valid fields are "
                             f"{', '.join(fields)} (moe-sim hardware lists them)")
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise InputError(f"{source}: hardware file is missing field(s) {', '.join(missing)}")
        values: dict[str, Any] = {"name": str(data["name"])}
        for n, v in data.items():
            if n == "name":
                continue
            if v is None and n in ("price_per_gpu_hour", "profile"):
                values[n] = None
                continue
            if n == "profile":
                values[n] = str(v)
                continue
            try:
                values[n] = float(v)
            except (TypeError, ValueError):
                raise InputError(f"{source}: hardware field {n} must be a number, got {v!r}") from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Presets: NVIDIA A100/H100/H200/HGX B200 datasheets (dense BF16 = half the sparsity figure), the AMD MI300X
# datasheet, as collected in the ml-engineering accelerator tables (stas00/ml-engineering). Scale-out: one
# 400 Gb/s NIC per GPU for every preset.
PRESETS: dict[str, GpuSpec] = {
    "a100": GpuSpec("a100", bf16_flops=312 * TB, hbm_bytes=80 * GB, hbm_bandwidth=2.0 * TB,
                    # A100 SXM 80 GB, NVLink3
                    scale_up_bandwidth=300 * GB, scale_out_bandwidth=NIC_400G_BANDWIDTH),
    "h100": GpuSpec("h100", bf16_flops=989 * TB, hbm_bytes=80 * GB, hbm_bandwidth=3.35 * TB,
                    scale_up_bandwidth=450 * GB, scale_out_bandwidth=NIC_400G_BANDWIDTH),  # H100 SXM, NVLink4
    "h200": GpuSpec("h200", bf16_flops=989 * TB, hbm_bytes=141 * GB, hbm_bandwidth=4.8 * TB,
                    scale_up_bandwidth=450 * GB, scale_out_bandwidth=NIC_400G_BANDWIDTH),  # H200 SXM, NVLink4
    # B200 HGX 1000 W; HBM listed as 180-192 GB: the lower figure, so that a fit is never optimistic.
    "b200": GpuSpec("b200", bf16_flops=2250 * TB, hbm_bytes=180 * GB, hbm_bandwidth=8.0 * TB,
                    scale_up_bandwidth=900 * GB, scale_out_bandwidth=NIC_400G_BANDWIDTH),  # NVLink5
    # MI300X: Infinity Fabric is 448 GB/s aggregate per GPU but only 64 GB/s to each peer (full mesh); the
    # aggregate is what an all-to-all over all 7 peers can use.
    "mi300x": GpuSpec("mi300x", bf16_flops=1300 * TB, hbm_bytes=192 * GB, hbm_bandwidth=5.3 * TB,
                      scale_up_bandwidth=448 * GB, scale_out_bandwidth=NIC_400G_BANDWIDTH),
}


@dataclass(frozen=True)
class ClusterLayout:
    """G GPUs in nodes of gpus_per_node; the all-to-all is NVLink-class inside a node and NIC-class across
    nodes."""

    num_gpus: int
    gpus_per_node: int
    num_nodes: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if self.num_gpus < 1:
            raise InputError(f"--gpus must be at least 1, got {self.num_gpus}")
        if self.gpus_per_node < 1:
            raise InputError(f"--gpus-per-node must be at least 1, got {self.gpus_per_node}")
        if self.num_gpus % self.gpus_per_node and self.num_gpus > self.gpus_per_node:
            raise InputError(
                f"--gpus {self.num_gpus} is not divisible into nodes of --gpus-per-node {self.gpus_per_node}"
            )
        # Fewer GPUs than a node holds: one partly filled node.
        object.__setattr__(self, "num_nodes", max(1, self.num_gpus // self.gpus_per_node))

    @property
    def gpus_in_node(self) -> int:
        return min(self.num_gpus, self.gpus_per_node)


COST_MODELS = ("profile", "roofline")


def load_hardware(name_or_path: str, cost_model: str = "profile") -> GpuSpec:
    """A preset name (h100, h200, b200, a100, mi300x), a cost profile written by `moe-sim calibrate`, or a
    YAML/JSON file with GpuSpec's fields.

    cost_model "profile" (the default) prices a preset with its shipped measured profile, or with the nearest
    measured one moved by datasheet ratios; "roofline" prices with peak figures and efficiencies only.
    """
    if cost_model not in COST_MODELS:
        raise InputError(f"--cost-model must be one of {', '.join(COST_MODELS)}, got {cost_model!r}")
    spec = _load_spec(name_or_path.strip())
    if cost_model == "roofline":
        return dataclasses.replace(spec, profile=None)
    return spec


def _load_spec(key: str) -> GpuSpec:
    from simulator.profiles import is_profile_file, load_profile, nearest_shipped_profile, shipped_profile

    if key.lower() in PRESETS:
        spec = PRESETS[key.lower()]
        measured = shipped_profile(spec.name) or nearest_shipped_profile()
        return dataclasses.replace(spec, profile=str(measured) if measured else None)
    path = Path(key)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        return GpuSpec.from_name(key)  # raises with the list of presets
    if not path.exists():
        raise InputError(f"{path}: hardware file not found")
    if is_profile_file(path):
        prof = load_profile(path)
        if prof.hardware not in PRESETS:
            raise InputError(f"{path}: profile was measured on {prof.hardware!r}, which is not a preset "
                             f"({', '.join(PRESETS)}); its peak figures are unknown")
        return dataclasses.replace(PRESETS[prof.hardware], name=path.stem, profile=str(path))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read hardware file ({exc.__class__.__name__})") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise different types; both mean a malformed file
        raise InputError(f"{path}: cannot parse hardware file ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: hardware file must hold a mapping of field names to values")
    data.setdefault("name", path.stem)
    # a hypothetical GPU is derived from the nearest measured one; `profile: null` opts out
    if "profile" not in data:
        measured = nearest_shipped_profile()
        data["profile"] = str(measured) if measured else None
    elif data["profile"] is not None:
        data["profile"] = str((path.parent / str(data["profile"])).resolve())
    return GpuSpec.from_dict(data, str(path))


def parse_hardware_list(text: str, cost_model: str = "profile") -> list[GpuSpec]:
    """Comma-separated presets or files: "h100,h200,my_gpu.yaml"."""
    items = [t for t in (s.strip() for s in text.split(",")) if t]
    if not items:
        raise InputError("--hardware: give at least one preset or file")
    return [load_hardware(t, cost_model) for t in items]
