"""Small dumps in each engine's own layout (written as the engine writes them), with the rows a trace should
hold.

Each builder returns the files it wrote and `Expected`: per token the sequence, position, phase, step, token
id and logical expert ids [T, L, K] the import must reproduce exactly. The model is the olmoe-1b-7b preset (16
MoE layers, 64 experts, top-8) unless a test says otherwise.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

L, E, K = 16, 64, 8


@dataclass
class Expected:
    seq_id: np.ndarray
    position: np.ndarray
    phase: np.ndarray
    step: np.ndarray
    expert_ids: np.ndarray  # [T, L, K] logical
    token_id: np.ndarray | None = None
    expert_weights: np.ndarray | None = None


def first_seen(values: np.ndarray) -> np.ndarray:
    """Renumber ids 0, 1, ... in order of first appearance (how importers number sequences)."""
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse]


def choose(rng: np.random.Generator, n: int, layers: int = L, experts: int = E, k: int = K) -> np.ndarray:
    """[n, layers, k] distinct expert ids per (token, layer)."""
    return np.argsort(rng.random((n, layers, experts)), axis=-1)[..., :k]


def sglang_per_token(directory: Path, *, ranks: int = 2, data_parallel: bool = True, redundant: int = 2,
                     seed: int = 0) -> tuple[list[Path], Expected]:
    """Per-rank `expert_distribution_recorder_*_{rank}.pt` files of the per_token mode.

    Physical experts: E logical ones then `redundant` replicas of experts 3 and 5; the recorder's ids are
    physical (a token sent to expert 3 may name physical slot 64). Each rank: one extend pass of two prompts
    (5 and 3 tokens), a mixed pass (a 2-token chunk of a new prompt beside one decode token) and a decode
    pass. With data_parallel=False every rank records the same batches (plain tensor parallelism), which the
    import keeps once.
    """
    import torch

    rng = np.random.default_rng(seed)
    replicas = np.array([3, 5][:redundant] if redundant else [], dtype=np.int64)
    p2l = np.tile(np.concatenate([np.arange(E), replicas]), (L, 1))
    physical_of = {int(e): E + i for i, e in enumerate(replicas)}
    rows: dict[str, list] = {k: [] for k in ("seq_id", "position", "phase", "step", "token_id", "ids")}
    paths = []
    seq_base = 0
    same = None
    for rank in range(ranks):
        if not data_parallel and same is not None:
            records = same
        else:
            records = []
            passes = [  # (mode, [(seq, start position, length, phase)], extend_seq_lens or None)
                (1, [(0, 0, 5, 0), (1, 0, 3, 0)], [5, 3]),
                (3, [(2, 0, 2, 0), (0, 5, 1, 1)], [2, 1]),
                (2, [(0, 6, 1, 1), (1, 3, 1, 1)], None),
            ]
            for step, (mode, segs, lens) in enumerate(passes):
                n = sum(s[2] for s in segs)
                logical = choose(rng, n)
                phys = logical.copy()
                flip = rng.random(phys.shape) < 0.5  # half of the choices of 3 and 5 go to their replicas
                for e, p in physical_of.items():
                    phys[(logical == e) & flip] = p
                topk = np.full((L, n, 8), -1, dtype=np.int32)
                topk[:, :, :K] = phys.transpose(1, 0, 2)
                positions, input_ids = [], []
                for seq, start, length, phase in segs:
                    for j in range(length):
                        positions.append(start + j)
                        tok = 1000 * (seq_base + seq) + start + j
                        input_ids.append(tok)
                        rows["seq_id"].append(seq_base + seq)
                        rows["position"].append(start + j)
                        rows["phase"].append(phase)
                        rows["step"].append(step)
                        rows["token_id"].append(tok)
                rows["ids"].append(logical)
                records.append(dict(forward_pass_id=step, rank=rank, gatherer_key="primary",
                                    input_ids=input_ids, positions=positions, extend_seq_lens=lens,
                                    forward_mode=mode,
                                    topk_ids_of_layer=torch.tensor(topk), misc_objects=[],
                                    global_physical_count=torch.zeros((L, p2l.shape[1]), dtype=torch.int32)))
            same = records
            seq_base += 3
        path = directory / f"expert_distribution_recorder_1700000000.0_{rank}.pt"
        torch.save(dict(records=records, last_physical_to_logical_map=torch.tensor(p2l)), path)
        paths.append(path)
    # rows come out rank by rank, pass by pass; a merged trace orders them by pass
    order = np.argsort(np.asarray(rows["step"]), kind="stable")
    ids = np.concatenate(rows["ids"])
    exp = Expected(seq_id=first_seen(np.asarray(rows["seq_id"])[order]),
                   position=np.asarray(rows["position"])[order], phase=np.asarray(rows["phase"])[order],
                   step=np.asarray(rows["step"])[order],
                   expert_ids=ids[order], token_id=np.asarray(rows["token_id"])[order])
    return paths, exp


def megatron_trace(directory: Path, *, ranks: int = 2, steps: int = 3, tokens: int = 4, seed: int = 1,
                   with_mtp: bool = True) -> tuple[list[Path], Expected]:
    """router_trace_rank{N}.jsonl files as Megatron-Core's RouterTracer writes them (one line per step and
    layer)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("seq_id", "position", "step", "ids", "rank")}
    paths = []
    per_rank = []
    for rank in range(ranks):
        lines = []
        for step in range(steps):
            ids = choose(rng, tokens)
            for layer in range(L):
                lines.append({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer,
                              "rank": rank, "num_tokens": tokens, "topk": K,
                              "top_indices": ids[:, layer].tolist()})
            if with_mtp:
                lines.append({"step": step, "stage": "pre_dispatch", "block": "mtp", "mtp_idx": 0, "layer": 0,
                              "rank": rank, "num_tokens": tokens, "topk": K,
                              "top_indices": choose(rng, tokens, 1)[:, 0].tolist()})
            per_rank.append((step, rank, ids))
        path = directory / f"router_trace_rank{rank}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        paths.append(path)
    per_rank.sort(key=lambda x: (x[0], x[1]))
    for seq, (step, _, ids) in enumerate(per_rank):
        rows["seq_id"] += [seq] * tokens
        rows["position"] += list(range(tokens))
        rows["step"] += [step] * tokens
        rows["ids"].append(ids)
    n = len(rows["step"])
    return paths, Expected(seq_id=np.asarray(rows["seq_id"]), position=np.asarray(rows["position"]),
                           phase=np.zeros(n, dtype=np.int64), step=np.asarray(rows["step"]),
                           expert_ids=np.concatenate(rows["ids"]))


def npy_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def vllm_responses(path: Path, *, requests: tuple[tuple[int, int], ...] = ((5, 3), (2, 4)),
                   seed: int = 2) -> tuple[list[Path], Expected]:
    """OpenAI completions responses with routed experts (base64 .npy [prompt + completion - 1, L, K]), one per
    line.

    requests: (prompt tokens, completion tokens) of each. The last generated token is never forwarded.
    """
    rng = np.random.default_rng(seed)
    lines = []
    rows: dict[str, list] = {k: [] for k in ("seq_id", "position", "phase", "step", "token_id", "ids")}
    step = 0
    for seq, (p, c) in enumerate(requests):
        n = p + c - 1
        ids = choose(rng, n)
        prompt_ids = [10 * seq + i for i in range(p)]
        gen = [500 + 10 * seq + i for i in range(c)]
        lines.append({"id": f"cmpl-{seq}", "object": "text_completion", "prompt_token_ids": prompt_ids,
                      "choices": [{"index": 0, "text": "...", "token_ids": gen, "finish_reason": "length",
                                   "routed_experts": npy_b64(ids.astype(np.int16))}],
                      "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
        for t in range(n):
            rows["seq_id"].append(seq)
            rows["position"].append(t)
            rows["phase"].append(0 if t < p else 1)
            rows["step"].append(step + max(0, t - p + 1))
            rows["token_id"].append((prompt_ids + gen)[t])
        rows["ids"].append(ids)
        step = rows["step"][-1] + 1
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return [path], Expected(**{k: np.asarray(v) for k, v in rows.items() if k != "ids"},
                            expert_ids=np.concatenate(rows["ids"]))


def tabular_rows(*, seed: int = 3, sequences: int = 3, tokens: int = 4) -> tuple[list[dict], Expected]:
    """One row per (request, layer, token) with the expert list and gating probabilities, as public dumps hold
    them, in request-major, layer-major order (a token's layers are far apart). Request ids are strings."""
    rng = np.random.default_rng(seed)
    rows = []
    ids = choose(rng, sequences * tokens)
    weights = rng.random(ids.shape).astype(np.float32)
    for s in range(sequences):
        for layer in range(L):
            for t in range(tokens):
                i = s * tokens + t
                rows.append({"request_id": f"req-{s}", "layer": layer, "token_idx": t,
                             "topk_ids": ids[i, layer].tolist(), "topk_weights": weights[i, layer].tolist()})
    n = sequences * tokens
    exp = Expected(seq_id=np.repeat(np.arange(sequences), tokens),
                   position=np.tile(np.arange(tokens), sequences), phase=np.zeros(n, dtype=np.int64),
                   step=np.repeat(np.arange(sequences), tokens),
                   expert_ids=ids, expert_weights=weights)
    return rows, exp
