"""vLLM's routed experts (`--enable-return-routed-experts`), saved as JSON or JSON-lines responses.

A completion's `routed_experts` is an int array [rows, layers, top-k]: one row per token that went through a
forward pass, prompt first (docs/import.md cites the code). Two saved forms are read:
- OpenAI API responses: {"choices": [{"routed_experts": base64 of a .npy (or nested lists), "token_ids"?}],
  "usage": {"prompt_tokens"}, "prompt_token_ids"?};
- offline `LLM.generate` outputs dumped as {"prompt_token_ids": [...], "outputs": [{"routed_experts",
  "token_ids"}]}.
Responses carry no batch schedule: requests are laid out one after another (a prefill step, then one decode
step per generated token), which the simulator's own batching regroups.
Shape legend: T rows of one completion, L MoE layers, K top-k.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import numpy as np

from traces.errors import InputError
from traces.importers.safe_load import as_int_array, json_records, require
from traces.importers.sink import TraceSink
from traces.schema import PHASE_DECODE, PHASE_PREFILL

MAX_NPY_BYTES = 1 << 31  # a base64 payload whose .npy header declares more than this is refused


def decode_routed_experts(value: Any, where: str) -> np.ndarray:
    """routed_experts as an int64 array [T, L, K], from base64 .npy (never unpickled) or nested lists."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"{where}: routed_experts is neither nested lists nor base64 ({exc})") from exc
        try:
            buf = io.BytesIO(raw)
            version = np.lib.format.read_magic(buf)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(buf) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(buf))
            if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > min(MAX_NPY_BYTES, len(raw)):
                raise InputError(f"{where}: routed_experts declares shape {shape}, more than its payload "
                                 "holds")
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except InputError:
            raise
        # numpy parses the header with Python's tokenizer: any parse error can come out
        except Exception as exc:
            raise InputError(f"{where}: routed_experts is not a .npy array ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from exc
        return as_int_array(arr, f"{where}: routed_experts", 3)
    return as_int_array(value, f"{where}: routed_experts", 3)


def _completions(record: dict[str, Any], where: str) -> tuple[list[tuple[str, dict[str, Any]]],
                                                              list[int] | None, int | None]:
    """(completions with where, prompt token ids or None, prompt length or None) of one saved response."""
    if "choices" in record:
        choices = record["choices"]
        usage = record.get("usage") or {}
        prompt_ids = record.get("prompt_token_ids")
        prompt_len = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    elif "outputs" in record:
        choices = record["outputs"]
        prompt_ids = record.get("prompt_token_ids")
        prompt_len = None
    else:
        raise InputError(f"{where}: missing field 'choices' (API response) or 'outputs' (offline output)")
    if not isinstance(choices, list):
        raise InputError(f"{where}: 'choices' is not a list")
    out = []
    for i, choice in enumerate(choices):
        w = f"{where}, choice {i}"
        require(choice, ("routed_experts",), w)
        out.append((w, choice))
        if prompt_ids is None and isinstance(choice.get("prompt_token_ids"), list):
            prompt_ids = choice["prompt_token_ids"]
    if prompt_ids is not None:
        prompt_ids = [int(x) for x in as_int_array(prompt_ids, f"{where}: prompt_token_ids", 1)]
        prompt_len = len(prompt_ids)
    return out, prompt_ids, int(prompt_len) if prompt_len is not None else None


def import_responses(paths: list[Path], sink: TraceSink) -> dict[str, Any]:
    meta = sink.metadata
    seq = 0
    step = 0
    want_tokens: bool | None = None  # token ids are stored when the first completion has them
    for path in paths:
        for where, record in json_records(path):
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a response object, found {type(record).__name__}")
            completions, prompt_ids, prompt_len = _completions(record, where)
            for w, choice in completions:
                ids = decode_routed_experts(choice["routed_experts"], w)  # [T, R, K]
                n = ids.shape[0]
                if ids.shape[2] != meta.top_k:
                    raise InputError(f"{w}: routed_experts holds {ids.shape[2]} experts per token, the "
                                     f"model's top-k is {meta.top_k}")
                if ids.shape[1] == meta.num_hidden_layers and meta.num_hidden_layers != meta.num_moe_layers:
                    ids = ids[:, meta.moe_layers]
                elif ids.shape[1] != meta.num_moe_layers:
                    raise InputError(f"{w}: routed_experts has {ids.shape[1]} layers, the model "
                                     f"{meta.num_moe_layers} MoE layers")
                if prompt_len is None:
                    raise InputError(f"{w}: no prompt length (needs usage.prompt_tokens or prompt_token_ids)")
                if n < prompt_len:
                    raise InputError(f"{w}: routed_experts has {n} rows, fewer than the {prompt_len} prompt "
                                     "tokens")
                tokens = None
                if prompt_ids is not None and isinstance(choice.get("token_ids"), list):
                    gen = [int(x) for x in as_int_array(choice["token_ids"], f"{w}: token_ids", 1)]
                    if len(gen) < n - prompt_len:
                        raise InputError(f"{w}: {len(gen)} generated token ids for {n - prompt_len} decode "
                                         "rows")
                    tokens = np.asarray(prompt_ids + gen[:n - prompt_len], dtype=np.int64)
                position = np.arange(n)
                phase = np.where(position < prompt_len, PHASE_PREFILL, PHASE_DECODE).astype(np.uint8)
                steps = step + np.maximum(position - prompt_len + 1, 0)
                if want_tokens is None:
                    want_tokens = tokens is not None
                if want_tokens and tokens is None:
                    raise InputError(f"{w}: has no token ids (token_ids and prompt_token_ids), unlike the "
                                     "responses before it")
                sink.add(seq_id=np.full(n, seq), position=position, phase=phase, step=steps, expert_ids=ids,
                         token_id=tokens if want_tokens else None, where=w)
                seq += 1
                step = int(steps[-1]) + 1 if n else step
    return {"requests": seq}
