"""Importers: serving engines' and other tools' routing dumps to trace v1 (or, for count-only dumps, a load
file).

One module per source tool; each streams its files into a TraceSink (sink.py), which checks ids and writes the
trace crash-safely. The model's shapes come from a preset or a config.json (model_shape.py). docs/import.md
describes every layout, with the engine code it was read from.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traces.errors import InputError
from traces.importers.model_shape import import_metadata
from traces.importers.tabular import Columns
from traces.schema import PHASE_DECODE, PHASE_PREFILL

# --from name -> (metadata source, count-only, one-line description shown by --help)
FORMATS: dict[str, tuple[str, bool, str]] = {
    "sglang-per-token": ("sglang", False,
                         "SGLang expert distribution recorder, per_token mode (.pt per rank)"),
    "sglang-stat": ("sglang", True,
                    "SGLang recorder, stat mode: logical_count [steps, layers, experts] (.pt)"),
    "sglang-per-pass": ("sglang", True,
                        "SGLang recorder, per_pass mode: global_physical_count per pass (.pt)"),
    "vllm": ("vllm", False, "vLLM routed experts in saved JSON / JSONL responses"),
    "megatron": ("megatron", False,
                 "Megatron-Core router tracer, router_trace_rank{N}.jsonl (files or a directory)"),
    "tabular": ("tabular", False, "JSONL, CSV or Parquet with named columns (see --seq-col and friends)"),
    "hf-router-logits": ("hf-router-logits", False,
                         "Hugging Face output_router_logits saved as .safetensors"),
}
DIRECTORY_PATTERNS = {"megatron": "router_trace_rank*.jsonl", "sglang-per-token": "*.pt",
                      "sglang-stat": "*.pt", "sglang-per-pass": "*.pt", "hf-router-logits": "*.safetensors"}


@dataclass
class ImportOptions:
    """Format-specific choices; each importer reads the ones it needs."""

    phase: str = "prefill"  # megatron: the phase every token gets
    columns: Columns = field(default_factory=Columns)  # tabular
    # hf-router-logits: what the saved tensors are ("logits" or "probabilities")
    router_output: str = "logits"
    keep_logits: bool = False  # hf-router-logits: store the router logits column too


@dataclass
class ImportResult:
    output: Path
    kind: str  # "trace" or "load file"
    num_tokens: int  # tokens written (trace) or selections counted / top-k (load file)
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "kind": self.kind, "num_tokens": self.num_tokens, **self.details}


def source_paths(sources: list[str], fmt: str) -> list[Path]:
    """Files named, globbed or (for formats with a file pattern) found in a directory, in sorted order."""
    out: list[Path] = []
    for src in sources:
        if glob.has_magic(src):
            matches = sorted(glob.glob(src))
            if not matches:
                raise InputError(f"{src}: no file matches this pattern")
            out.extend(Path(m) for m in matches)
        elif Path(src).is_dir():
            pattern = DIRECTORY_PATTERNS.get(fmt)
            found = sorted(Path(src).glob(pattern)) if pattern else []
            if not found:
                raise InputError(f"{src}: directory holds no {pattern or 'file this format reads'}")
            out.extend(found)
        else:
            out.append(Path(src))
    if not out:
        raise InputError("no source file given")
    return out


def import_dump(sources: list[str], output: str | Path, fmt: str, *, model: str | None = None,
                config: str | None = None, options: ImportOptions | None = None, force: bool = False,
                compression: str | None = None, command_line: str = "",
                on_tokens: Callable[[int], None] | None = None) -> ImportResult:
    """Convert dumps of format `fmt` to a trace at `output` (or a load file for count-only formats)."""
    if fmt not in FORMATS:
        raise InputError(f"--from: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tool, count_only, _ = FORMATS[fmt]
    options = options or ImportOptions()
    paths = source_paths(sources, fmt)
    out = Path(output)
    meta = import_metadata(model=model, config=config, source=tool, command_line=command_line,
                           notes={"import_format": fmt, "imported_from": [str(p) for p in paths[:64]]})
    if count_only:
        if out.suffix.lower() != ".json":
            raise InputError(f"{out}: --from {fmt} holds counts only, no per-token ids; write a load file "
                             "(-o NAME.json) for moe-sim place, plan --load-file and report --load-file")
        return _import_counts(paths, out, fmt, meta, force)
    from traces.importers.sink import TraceSink

    with TraceSink(out, meta, force=force, compression=compression, on_tokens=on_tokens) as sink:
        details = _run_importer(fmt, paths, sink, options)
        written = sink.close(paths)
    return ImportResult(written, "trace", sink.num_tokens, details)


def _run_importer(fmt: str, paths: list[Path], sink: Any, options: ImportOptions) -> dict[str, Any]:
    if fmt == "sglang-per-token":
        from traces.importers.sglang import import_per_token

        return import_per_token(paths, sink)
    if fmt == "megatron":
        from traces.importers.megatron import import_router_trace

        phases = {"prefill": PHASE_PREFILL, "decode": PHASE_DECODE}
        if options.phase not in phases:
            raise InputError(f"--phase: choose prefill or decode, not {options.phase!r}")
        return import_router_trace(paths, sink, phases[options.phase])
    if fmt == "vllm":
        from traces.importers.vllm import import_responses

        return import_responses(paths, sink)
    if fmt == "tabular":
        from traces.importers.tabular import import_table

        return import_table(paths, sink, options.columns)
    from traces.importers.hf_logits import import_safetensors

    if options.router_output not in ("logits", "probabilities"):
        raise InputError(f"--router-output: choose logits or probabilities, not {options.router_output!r}")
    return import_safetensors(paths, sink, router_output=options.router_output,
                              keep_logits=options.keep_logits)


def _import_counts(paths: list[Path], out: Path, fmt: str, meta: Any, force: bool) -> ImportResult:
    from traces.importers.sglang import logical_counts_per_pass, logical_counts_stat
    from traces.loadfile import LoadFile, write_load_file

    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    counts, steps = (logical_counts_stat if fmt == "sglang-stat" else logical_counts_per_pass)(paths, meta)
    if not counts.any():
        raise InputError(f"{paths[0]}: the dumps count no selection; nothing to import")
    load = LoadFile(layers=list(meta.moe_layers), load=counts, source=f"sglang {fmt.removeprefix('sglang-')}",
                    model_id=meta.model_id, top_k=meta.top_k, num_hidden_layers=meta.num_hidden_layers,
                    steps=steps, notes={"imported_from": [str(p) for p in paths[:64]]})
    written = write_load_file(out, load, force=force)
    # per layer
    return ImportResult(written, "load file", int(counts.sum(axis=1).max() // max(1, meta.top_k)),
                        {"steps": steps, "layers": len(load.layers)})
