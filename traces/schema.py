"""Trace format v1: the contract between the recorder and the simulator.

One logical schema, two encodings (HDF5 and Arrow IPC), documented in docs/trace-format.md.
Shape legend: T tokens, L MoE layers, K top-k, E experts per layer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from traces.errors import InputError

SCHEMA_VERSION = 1
# Minor revisions add to v1 without breaking its readers. 1: every block carries a checksum
# (traces/checksum.py), checked by every read; files of minor 0 (written before) have none and read as
# "unchecked".
FORMAT_MINOR = 1
FORMAT_NAME = "moe-trace"

PHASE_PREFILL = 0
PHASE_DECODE = 1
PHASE_NAMES = {PHASE_PREFILL: "prefill", PHASE_DECODE: "decode"}

# Per-token columns, their dtype and per-token shape (None: depends on the metadata).
TOKEN_FIELDS: dict[str, np.dtype] = {
    "seq_id": np.dtype(np.int32),  # which prompt
    "position": np.dtype(np.int32),  # position in the sequence (0 = first prompt token)
    "token_id": np.dtype(np.int32),  # omitted with --no-token-ids
    "phase": np.dtype(np.uint8),  # PHASE_PREFILL or PHASE_DECODE
    "step": np.dtype(np.int32),  # forward pass number within the recording
}
ROUTING_FIELDS = ("expert_ids", "expert_weights", "router_logits")
ALL_FIELDS = tuple(TOKEN_FIELDS) + ROUTING_FIELDS
REQUIRED_FIELDS = ("seq_id", "position", "phase", "step", "expert_ids")

# Metadata keys that must agree between shards of one trace (provenance keys may differ).
# Values of the `source` metadata key: how the routing was obtained. Imported traces name the tool the dump
# came from (see docs/import.md); only "recorded" traces carry transformers and torch versions.
IMPORTED_SOURCES = ("sglang", "vllm", "megatron", "tabular", "hf-router-logits")
SOURCES = ("recorded", "synthetic", *IMPORTED_SOURCES)

PROVENANCE_KEYS = frozenset(
    {"created_at", "command_line", "prompts_sha256", "status", "tool_version", "shard_index", "notes",
     "format_minor"}
)


def current_tool_version() -> str:
    """moe-trace's installed version, for the tool_version metadata key."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-trace")
    except PackageNotFoundError:  # a source tree that was not installed
        return "0.0.0+source"


def stamp_provenance(metadata: TraceMetadata) -> None:
    """Fill created_at (now, UTC) and tool_version when a writer left them empty, so the file validates."""
    from datetime import datetime, timezone

    if not metadata.created_at:
        metadata.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not metadata.tool_version:
        metadata.tool_version = current_tool_version()


def expert_id_dtype(num_experts: int) -> np.dtype:
    """uint8 when expert ids fit in a byte, else uint16."""
    if num_experts <= 256:
        return np.dtype(np.uint8)
    if num_experts <= 65536:
        return np.dtype(np.uint16)
    raise InputError(f"{num_experts} experts per layer is more than trace format v1 supports (65536)")


@dataclass
class TraceMetadata:
    """File-level metadata of a trace. Every field is stored; see docs/trace-format.md."""

    model_id: str  # hub id, local path, or a built-in name such as "olmoe-tiny"
    model_type: str  # transformers config.model_type, e.g. "olmoe"
    num_hidden_layers: int  # all decoder layers, dense ones included
    moe_layers: list[int]  # decoder-layer indices of the MoE layers, in trace order
    moe_module_names: list[str]  # module path of each MoE layer's router
    num_experts: int  # routed experts per MoE layer
    top_k: int
    hidden_size: int
    expert_intermediate_size: int  # FFN size of one routed expert
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0  # FFN size of one shared expert
    router_scoring: str = "softmax"  # "softmax" or "sigmoid"
    norm_topk_prob: bool = False  # top-k weights renormalised to sum to 1
    router_first_output: str = "logits"  # what the router's first output was: "logits" or "probabilities"
    routed_scaling_factor: float = 1.0  # factor already applied to recorded weights (DeepSeek)
    expert_activation: str = "swiglu"  # expert FFN kind: "swiglu" (3 matrices) or "mlp" (2 matrices)
    vocab_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    dense_intermediate_size: int = 0  # FFN size of the dense (non-MoE) layers, 0 when there are none
    model_revision: str | None = None
    model_dtype: str = "float32"
    weights_dtype: str = "float16"  # "float16" or "float32"
    has_token_ids: bool = True
    has_weights: bool = True
    has_logits: bool = False
    source: str = "recorded"  # one of SOURCES: "recorded", "synthetic" or the tool an imported dump came from
    transformers_version: str | None = None
    torch_version: str | None = None
    prompts_sha256: str | None = None
    tool_version: str = ""
    created_at: str = ""
    command_line: str = ""
    status: str = "partial"  # "partial" until the writer closes cleanly, then "complete"
    schema_version: int = SCHEMA_VERSION
    # set by the writer to FORMAT_MINOR; 0 (absent) in files written before block checksums
    format_minor: int = 0
    notes: dict[str, Any] = field(default_factory=dict)  # free-form extras (synthetic parameters, ...)

    def __post_init__(self) -> None:
        if len(self.moe_layers) != len(self.moe_module_names):
            raise InputError("metadata: moe_layers and moe_module_names differ in length")
        if not 0 < self.top_k <= self.num_experts:
            raise InputError(f"metadata: top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.weights_dtype not in ("float16", "float32"):
            raise InputError(f"metadata: weights_dtype must be float16 or float32, not {self.weights_dtype}")
        if self.router_scoring not in ("softmax", "sigmoid"):
            raise InputError("metadata: router_scoring must be softmax or sigmoid, not "
                             f"{self.router_scoring}")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def id_dtype(self) -> np.dtype:
        return expert_id_dtype(self.num_experts)

    @property
    def flops_per_assignment(self) -> int:
        """Expert FLOPs for one token sent to one expert: 2 FLOPs per multiply-add and 3 (SwiGLU) or 2
        matrices."""
        matrices = 3 if self.expert_activation == "swiglu" else 2
        return 2 * matrices * self.hidden_size * self.expert_intermediate_size

    def field_shape(self, name: str) -> tuple[int, ...]:
        """Per-token shape of a column."""
        if name in TOKEN_FIELDS:
            return ()
        if name in ("expert_ids", "expert_weights"):
            return (self.num_moe_layers, self.top_k)
        if name == "router_logits":
            return (self.num_moe_layers, self.num_experts)
        raise KeyError(name)

    def field_dtype(self, name: str) -> np.dtype:
        if name in TOKEN_FIELDS:
            return TOKEN_FIELDS[name]
        if name == "expert_ids":
            return self.id_dtype
        if name == "expert_weights":
            return np.dtype(self.weights_dtype)
        if name == "router_logits":
            return np.dtype(np.float16)
        raise KeyError(name)

    def stored_fields(self) -> list[str]:
        """Columns present in a file with this metadata, in storage order."""
        names = ["seq_id", "position"]
        if self.has_token_ids:
            names.append("token_id")
        names += ["phase", "step", "expert_ids"]
        if self.has_weights:
            names.append("expert_weights")
        if self.has_logits:
            names.append("router_logits")
        return names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "trace") -> TraceMetadata:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"{source}: unknown trace schema version {version!r} (this tool reads "
                             f"{SCHEMA_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise InputError(f"{source}: metadata is missing {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in names}
        try:
            return cls(**known)
        except TypeError as exc:
            raise InputError(f"{source}: bad metadata ({exc})") from exc

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "trace") -> TraceMetadata:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{source}: metadata is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise InputError(f"{source}: metadata is not a JSON object")
        return cls.from_dict(data, source)

    def contract(self) -> dict[str, Any]:
        """The fields that must agree between shards of one trace."""
        return {k: v for k, v in self.to_dict().items() if k not in PROVENANCE_KEYS}
