"""Load files: per-layer expert load for sources that count selections but keep no per-token ids.

SGLang's `stat` and `per_pass` dumps, per-layer load JSON or CSV and the OLMoE counts file all become this one
form. `moe-sim place`, `plan --load-file` and `report --load-file` read it. What a load file cannot show, and
every command that uses one says so: per-step imbalance, co-selection and all-to-all bytes, which need
per-token ids.

Format (JSON): {"format": "moe-trace-load", "version": 1, "source": tool or file, "model_id", "num_experts",
"top_k", "num_hidden_layers", "layers": [decoder-layer index per row], "load": [[count per expert] per row],
"steps": forward passes counted (0 = unknown), "created_at", "tool_version", "notes": {...}}.
Also read as they are: the OLMoE counts file ({"layers", "counts" | "domains"}), a per-layer load JSON
({"3": [count per expert], "4": [...]}) and CSV with the columns layer, expert, count (one row per layer and
expert).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import InputError, read_json

LOAD_FORMAT = "moe-trace-load"
LOAD_VERSION = 1
CANNOT_SHOW = "per-step imbalance, co-selection and all-to-all bytes (they need per-token expert ids)"


@dataclass
class LoadFile:
    """Expert selection counts of some MoE layers.

    load: [len(layers), E] selections per expert (float: files may hold shares or averaged counts).
    """

    layers: list[int]  # decoder-layer index of each row
    load: np.ndarray
    source: str  # the tool or file the counts came from
    model_id: str | None = None
    top_k: int = 0  # 0: unknown
    num_hidden_layers: int = 0  # 0: unknown (taken as the deepest listed layer + 1)
    steps: int = 0  # forward passes counted, 0: unknown
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.load = np.asarray(self.load, dtype=np.float64)
        if self.load.ndim != 2 or self.load.shape[0] != len(self.layers) or self.load.shape[1] == 0:
            raise InputError(f"{self.source}: load must be one row of experts per listed layer, "
                             f"got shape {self.load.shape} for {len(self.layers)} layers")
        if not np.isfinite(self.load).all() or (self.load < 0).any():
            raise InputError(f"{self.source}: loads must be finite and non-negative")
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise InputError(f"{self.source}: layers {self.layers} must be distinct non-negative indices")
        if not self.num_hidden_layers:
            self.num_hidden_layers = max(self.layers) + 1

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])

    def to_dict(self) -> dict[str, Any]:
        from datetime import datetime, timezone

        from traces.schema import current_tool_version

        return {
            "format": LOAD_FORMAT, "version": LOAD_VERSION, "source": self.source, "model_id": self.model_id,
            "num_experts": self.num_experts, "top_k": self.top_k, "num_hidden_layers": self.num_hidden_layers,
            "layers": self.layers, "steps": self.steps,
            "load": [[int(x) if float(x).is_integer() else float(x) for x in row] for row in self.load],
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tool_version": current_tool_version(), "cannot_show": CANNOT_SHOW, "notes": self.notes,
        }

    def rows_for(self, moe_layers: list[int], source: str) -> np.ndarray:
        """load [len(moe_layers), E] for a model's MoE layers; every one must be in the file."""
        missing = [i for i in moe_layers if i not in self.layers]
        if missing:
            raise InputError(f"{source}: the load file has no row for MoE layer {missing[0]} "
                             f"(it covers layers {self.layers})")
        index = {layer: row for row, layer in enumerate(self.layers)}
        return self.load[[index[i] for i in moe_layers]]


def write_load_file(path: str | Path, load: LoadFile, *, force: bool = False) -> Path:
    """Write a load file atomically (a temporary name, then a rename)."""
    from traces.writer import write_text_atomic

    return write_text_atomic(path, json.dumps(load.to_dict(), indent=1) + "\n", force=force)


def read_load_file(path: str | Path, domain: str | None = None) -> LoadFile:
    """A load file, an OLMoE counts file (domains summed unless `domain`) or a layer,expert,count CSV."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.suffix.lower() == ".csv":
        return _read_csv(p)
    data = read_json(p, "a load file (neither JSON nor .csv)")
    if not isinstance(data, dict):
        raise InputError(f"{p}: a load file holds one JSON object")
    if data.get("format") == LOAD_FORMAT:
        if data.get("version") != LOAD_VERSION:
            raise InputError(f"{p}: load file version {data.get('version')!r} (this tool reads "
                             f"{LOAD_VERSION})")
        for key in ("layers", "load"):
            if key not in data:
                raise InputError(f"{p}: load file is missing {key!r}")
        try:
            return LoadFile(layers=[int(i) for i in data["layers"]],
                            load=np.asarray(data["load"], dtype=np.float64),
                            source=str(data.get("source", p)), model_id=data.get("model_id"),
                            top_k=int(data.get("top_k") or 0),
                            num_hidden_layers=int(data.get("num_hidden_layers") or 0),
                            steps=int(data.get("steps") or 0), notes=dict(data.get("notes") or {}))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{p}: 'layers' and 'load' must be integers and a rectangular table of "
                             "numbers") from exc
    if "layers" in data and ({"counts", "domains"} & data.keys()):
        from traces.synthetic import load_counts

        table = load_counts(p, domain)
        return LoadFile(layers=table.layers, load=table.counts, source=str(data.get("source", p)),
                        model_id=data.get("model"), top_k=int(data.get("top_k") or 0),
                        num_hidden_layers=table.num_hidden_layers)
    # {"layer": [count per expert]}
    if data and all(isinstance(k, str) and k.strip().isdigit() for k in data):
        rows = {int(k): v for k, v in data.items()}
        layers = sorted(rows)
        try:
            load = np.asarray([rows[i] for i in layers], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{p}: a per-layer load JSON maps each layer to one list of counts per "
                             "expert") from None
        return LoadFile(layers=layers, load=load, source=str(p))
    raise InputError(f"{p}: not a load file (needs \"format\": \"{LOAD_FORMAT}\", OLMoE-style \"layers\" "
                     "with \"counts\" or \"domains\", or {\"layer\": [count per expert]})")


def _read_csv(p: Path) -> LoadFile:
    cells: dict[tuple[int, int], float] = {}
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        names = {n.strip().lower(): n for n in reader.fieldnames or []}
        count_col = names.get("count") or names.get("load")
        if "layer" not in names or "expert" not in names or count_col is None:
            raise InputError(f"{p}: a load CSV needs the columns layer, expert and count")
        for number, row in enumerate(reader, start=2):
            try:
                key = (int(row[names["layer"]]), int(row[names["expert"]]))
                value = float(row[count_col])
            except (TypeError, ValueError):
                raise InputError(f"{p}: line {number}: layer and expert must be integers, count a "
                                 "number") from None
            if key[1] < 0:
                raise InputError(f"{p}: line {number}: negative expert id {key[1]}")
            cells[key] = cells.get(key, 0.0) + value
    if not cells:
        raise InputError(f"{p}: the CSV holds no counts")
    layers = sorted({layer for layer, _ in cells})
    experts = max(e for _, e in cells) + 1
    load = np.zeros((len(layers), experts))
    row_of = {layer: i for i, layer in enumerate(layers)}
    for (layer, expert), value in cells.items():
        load[row_of[layer], expert] = value
    return LoadFile(layers=layers, load=load, source=str(p))


def counts_table(load: LoadFile) -> Any:
    """The load as traces.synthetic's CountsTable (expert popularity for synthetic steps)."""
    from traces.synthetic import CountsTable

    return CountsTable(layers=load.layers, counts=load.load, num_hidden_layers=load.num_hidden_layers,
                       source=load.source)
