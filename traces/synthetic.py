"""Synthetic traces: realistic routing at any scale without a GPU (for tests, demos and benchmarks).

The model, per sequence and per MoE layer (shape legend: T tokens, L layers, E experts, K top-k, C clusters):

* Popularity: each layer has an expert popularity vector pop[L, E]. Either Zipf, pop ~ rank^-skew over a
  seeded random permutation of the experts (skew 0 = uniform; 0.8 gives OLMoE-like max shares and entropies),
  or taken from a counts file (see load_counts and layer_popularity) such as data/olmoe_expert_counts.json.
* Co-selection: each layer's experts are split into C clusters ("topics") of equal popularity mass (so drawing
  from a uniformly chosen topic keeps each expert's popularity). A sequence has a current
  topic, shared by all layers, that it keeps from token to token and changes with probability topic_switch;
  part of each draw (cluster_weight) comes from that topic's cluster, so its experts are chosen together.
* Temporal locality: part of each draw (stickiness) re-uses one of the experts the same sequence's previous
  token chose at that layer.
* Top-k: K distinct experts drawn one by one from the mixture
  (1 - cluster_weight - stickiness) * pop + cluster_weight * pop|topic + stickiness * previous experts,
  rejecting repeats (sampling without replacement, proportional to the mixture).
* Weights: each chosen expert's mixture probability times logistic noise, then what the preset's router does:
  softmax un-renormalised (OLMoE: sums to less than 1), renormalised (norm_topk_prob), sigmoid scores, times
  routed_scaling_factor; listed in descending weight like torch.topk.
* Layout like a batched recorder: sequences in batches of batch_size; per batch one prefill forward pass
  (step) holding every prompt token of the batch, then one decode step per generated token across the batch's
  still-running sequences. Sequence lengths vary (uniform 0.5x..1.5x of the mean), decode_fraction of each
  sequence's tokens are generated ones. Token ids are uniform over the vocabulary.

* Group-limited routing (DeepSeek-V3: 256 experts in 8 groups of 32, a token uses at most 4 groups): the
  groups of a token's first draws are its groups; once topk_groups are in use, draws from other groups are
  drawn again.
Router logits are not synthesised (has_logits is False).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from traces.chunk import TraceChunk
from traces.errors import InputError, read_json
from traces.presets import get_preset, preset_metadata
from traces.schema import PHASE_DECODE, PHASE_PREFILL, TraceMetadata, current_tool_version
from traces.synth_kernels import alias_table

DEFAULT_CHUNK_TOKENS = 1 << 16
DEFAULT_SKEW = 0.8
_KERNEL_BLOCK = 8192  # rows routed per kernel call (bounds the kernel's scratch memory)


@dataclass
class CountsTable:
    """Per-expert selection counts of some layers of a real model."""

    layers: list[int]  # decoder-layer index of each row of counts
    counts: np.ndarray  # [len(layers), E]
    num_hidden_layers: int  # layers of the model the counts come from (for relative depth)
    source: str


@dataclass
class SynthConfig:
    """What to synthesise. Every field has a default; `tokens` and `seed` are the usual knobs."""

    model: str = "olmoe-1b-7b"  # a preset name (traces/presets.py)
    tokens: int = 100_000
    seed: int = 0
    skew: float = DEFAULT_SKEW  # Zipf exponent of expert popularity (ignored for layers given by counts)
    counts: CountsTable | None = None
    sequences: int | None = None  # default: tokens / 1024, at least 1
    decode_fraction: float = 0.25  # share of each sequence's tokens that are generated (decode phase)
    batch_size: int = 8  # sequences per forward pass
    num_clusters: int | None = None  # co-selection clusters per layer; default E // K (at least 2)
    cluster_weight: float = 0.3
    stickiness: float = 0.2
    topic_switch: float = 0.05
    noise_scale: float = 0.5
    weights_dtype: str = "float16"
    token_ids: bool = True
    extra_notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise InputError(f"--tokens: must be at least 1, not {self.tokens}")
        if self.skew < 0:
            raise InputError(f"--skew: must be 0 or more, not {self.skew}")
        if not 0.0 <= self.decode_fraction < 1.0:
            raise InputError(f"--decode-fraction: must be in [0, 1), not {self.decode_fraction}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size: must be at least 1, not {self.batch_size}")
        if self.sequences is not None and not 1 <= self.sequences <= self.tokens:
            raise InputError(f"--sequences: must be in 1..tokens ({self.tokens}), not {self.sequences}")
        for name in ("cluster_weight", "stickiness", "topic_switch"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"--{name.replace('_', '-')}: must be in [0, 1]")
        if self.cluster_weight + self.stickiness > 1.0:
            raise InputError("--cluster-weight plus --stickiness must not exceed 1")
        if self.weights_dtype not in ("float16", "float32"):
            raise InputError(f"--weights-dtype: must be float16 or float32, not {self.weights_dtype}")
        get_preset(self.model)  # fails early on an unknown model

    @property
    def num_sequences(self) -> int:
        return self.sequences if self.sequences is not None else max(1, self.tokens // 1024)


def load_counts(path: str | Path, domain: str | None = None) -> CountsTable:
    """Read a counts file: {"layers": [...], "counts": [[E]...]} or {"layers", "domains": {name: [[E]...]}}.

    With domains, `domain` picks one; by default the domains are summed. "num_hidden_layers" (optional) names
    the depth of the model the counts come from; otherwise it is taken as the deepest listed layer + 1.
    """
    path = Path(path)
    data = read_json(path, "a JSON counts file")
    if not isinstance(data, dict) or "layers" not in data or not ({"counts", "domains"} & data.keys()):
        raise InputError(f"{path}: counts file needs 'layers' and 'counts' or 'domains'")
    if "domains" in data:
        domains = data["domains"]
        if domain is not None:
            if domain not in domains:
                raise InputError(f"{path}: no domain {domain!r} (has {', '.join(domains)})")
            rows = domains[domain]
        else:
            rows = np.sum([np.asarray(v, dtype=np.float64) for v in domains.values()], axis=0)
    else:
        rows = data["counts"]
    counts = np.asarray(rows, dtype=np.float64)
    layers = [int(x) for x in data["layers"]]
    if counts.ndim != 2 or counts.shape[0] != len(layers) or not np.all(np.isfinite(counts)) or np.any(counts
                                                                                                       < 0):
        raise InputError(f"{path}: counts must be one non-negative row of experts per listed layer")
    depth = int(data.get("num_hidden_layers", max(layers) + 1))
    return CountsTable(layers=layers, counts=counts, num_hidden_layers=depth, source=str(path))


def layer_popularity(meta: TraceMetadata, config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """pop[L, E]: expert popularity per MoE layer (rows sum to 1, every entry > 0).

    From counts: a layer at the same relative depth as a counted layer uses those counts as they are; any
    other layer uses the counts of the nearest counted layer by relative depth with the expert ids shuffled (a
    seeded permutation), so it has a real layer's skew while its hot experts differ, as they do between real
    layers. Counts give each expert's share s of selections, i.e. a chance pi = K * s of being in a token's
    top-k (OLMoE layer 0's expert 0: 0.98). Drawing K without replacement caps such experts, so the draw
    weights are set by Rosen's approximation of successive sampling, pi = 1 - exp(-lambda * w), i.e. w =
    -log(1 - pi): the trace's selection shares then follow the counts.
    """
    num_layers, num_experts = meta.num_moe_layers, meta.num_experts
    pop = np.empty((num_layers, num_experts))
    table = config.counts
    if table is not None and table.counts.shape[1] != num_experts:
        raise InputError(
            f"{table.source}: counts have {table.counts.shape[1]} experts per layer, model {config.model} "
            f"has {num_experts}"
        )
    depth = np.asarray(meta.moe_layers, dtype=np.float64) / max(1, meta.num_hidden_layers - 1)
    for layer in range(num_layers):
        perm = rng.permutation(num_experts)
        if table is None:
            zipf = np.arange(1, num_experts + 1, dtype=np.float64) ** -config.skew
            pop[layer, perm] = zipf
            continue
        counted = np.asarray(table.layers, dtype=np.float64) / max(1, table.num_hidden_layers - 1)
        nearest = int(np.argmin(np.abs(counted - depth[layer])))
        share = (table.counts[nearest] + 0.5) / (table.counts[nearest] + 0.5).sum()  # no expert is impossible
        weight = -np.log1p(-np.minimum(meta.top_k * share, 0.995))
        pop[layer] = weight if math.isclose(counted[nearest], depth[layer]) else weight[perm]
    return pop / pop.sum(axis=1, keepdims=True)


@dataclass
class Clusters:
    """Co-selection clusters of every layer, with alias tables for drawing a member by popularity."""

    cluster_of: np.ndarray  # [L, E] cluster of each expert
    members: np.ndarray  # [L, C, M] experts of each cluster, padded with 0
    member_prob: np.ndarray  # [L, C, M] alias table (acceptance) over the members, by popularity
    member_alias: np.ndarray  # [L, C, M] alias table (alternative member index)
    member_count: np.ndarray  # [L, C]
    mass: np.ndarray  # [L, C] popularity summed over the cluster


def make_clusters(pop: np.ndarray, num_clusters: int, rng: np.random.Generator) -> Clusters:
    """Split each layer's experts into num_clusters clusters of near-equal popularity mass.

    Experts go, most popular first (ties in a seeded random order), to the cluster with the least mass so far
    (ties to a seeded random cluster). Equal masses matter: topics are drawn uniformly, so a draw from the
    topic's cluster then picks each expert with its popularity, and co-selection does not flatten the layer's
    skew.
    """
    num_layers, num_experts = pop.shape
    cluster_of = np.empty((num_layers, num_experts), np.int64)
    for layer in range(num_layers):
        order = np.lexsort((rng.permutation(num_experts), -pop[layer]))
        tie_break = rng.permutation(num_clusters)
        mass = np.zeros(num_clusters)
        for e in order:
            c = int(tie_break[np.argmin(mass[tie_break])])
            cluster_of[layer, e] = c
            mass[c] += pop[layer, e]
    size = max(int(np.bincount(row, minlength=num_clusters).max()) for row in cluster_of)
    members = np.zeros((num_layers, num_clusters, size), np.int64)
    member_prob = np.ones((num_layers, num_clusters, size))
    member_alias = np.zeros((num_layers, num_clusters, size), np.int64)
    count = np.zeros((num_layers, num_clusters), np.int64)
    masses = np.zeros((num_layers, num_clusters))
    for layer in range(num_layers):
        for c in range(num_clusters):
            ids = np.flatnonzero(cluster_of[layer] == c)
            count[layer, c] = len(ids)
            if not len(ids):
                continue
            members[layer, c, : len(ids)] = ids
            masses[layer, c] = pop[layer, ids].sum()
            prob, alias = alias_table(pop[layer, ids])
            member_prob[layer, c, : len(ids)] = prob
            member_alias[layer, c, : len(ids)] = alias
    return Clusters(cluster_of, members, member_prob, member_alias, count, masses)


def sequence_lengths(config: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompt[S], decode[S]): lengths summing to exactly config.tokens, each sequence 0.5x..1.5x the mean."""
    n, s = config.tokens, config.num_sequences
    share = rng.uniform(0.5, 1.5, size=s)
    exact = share / share.sum() * (n - s)  # every sequence gets 1 token first, the rest by share
    lengths = np.floor(exact).astype(np.int64)
    rest = (n - s) - int(lengths.sum())
    lengths[np.argsort(-(exact - lengths), kind="stable")[:rest]] += 1
    lengths += 1
    prompt = np.clip(np.round(lengths * (1.0 - config.decode_fraction)).astype(np.int64), 1, lengths)
    return prompt, lengths - prompt


def iter_layout(
    prompt: np.ndarray, decode: np.ndarray, batch_size: int, piece: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (seq_id, position, phase, step) blocks of at most `piece` rows in the order a recorder writes
    them."""
    num_seqs = len(prompt)
    step = 0
    for b0 in range(0, num_seqs, batch_size):
        seqs = np.arange(b0, min(b0 + batch_size, num_seqs))
        for s in seqs:
            for start in range(0, int(prompt[s]), piece):
                pos = np.arange(start, min(start + piece, int(prompt[s])), dtype=np.int32)
                yield (np.full(len(pos), s, np.int32), pos, np.full(len(pos), PHASE_PREFILL, np.uint8),
                       np.full(len(pos), step, np.int32))
        step += 1
        dec = decode[seqs]
        longest = int(dec.max())
        per = max(1, piece // len(seqs))
        for t0 in range(0, longest, per):
            t = np.arange(t0, min(t0 + per, longest))
            ti, si = np.nonzero(dec[None, :] > t[:, None])  # step-major, then sequence order
            seq = seqs[si]
            yield (seq.astype(np.int32), (prompt[seq] + t[ti]).astype(np.int32),
                   np.full(len(ti), PHASE_DECODE, np.uint8), (step + t[ti]).astype(np.int32))
        step += longest


def synth_metadata(config: SynthConfig) -> TraceMetadata:
    """The metadata a synthetic trace of this config carries (parameters recorded in notes)."""
    notes = {
        "synthetic": {
            "seed": config.seed,
            "skew": None if config.counts is not None else config.skew,
            "counts_file": config.counts.source if config.counts is not None else None,
            "sequences": config.num_sequences,
            "decode_fraction": config.decode_fraction,
            "batch_size": config.batch_size,
            "cluster_weight": config.cluster_weight,
            "stickiness": config.stickiness,
            "topic_switch": config.topic_switch,
            "noise_scale": config.noise_scale,
            **config.extra_notes,
        }
    }
    meta = preset_metadata(
        config.model,
        source="synthetic",
        weights_dtype=config.weights_dtype,
        has_token_ids=config.token_ids,
        has_logits=False,
        router_first_output="logits",
        notes=notes,
    )
    meta.notes["synthetic"]["num_clusters"] = _num_clusters(config, meta)
    return meta


def expert_groups(meta: TraceMetadata) -> tuple[int, int]:
    """(groups, groups a token may use) of group-limited routing, from the metadata notes; (1, 1) without
    it."""
    groups = int(meta.notes.get("expert_groups", 1))
    topk = int(meta.notes.get("topk_groups", groups))
    if groups < 1 or meta.num_experts % groups or not 1 <= topk <= groups:
        raise InputError(f"expert_groups {groups} / topk_groups {topk} do not fit {meta.num_experts} experts")
    if topk * (meta.num_experts // groups) < meta.top_k:
        raise InputError(f"top-{meta.top_k} does not fit in {topk} groups of {meta.num_experts // groups} "
                         "experts")
    return groups, topk


def _num_clusters(config: SynthConfig, meta: TraceMetadata) -> int:
    if config.num_clusters is not None:
        return max(1, min(config.num_clusters, meta.num_experts))
    return max(2, meta.num_experts // meta.top_k)


@dataclass
class SynthModel:
    """Everything drawn once per trace from the seed (before any token is routed)."""

    meta: TraceMetadata
    pop: np.ndarray  # [L, E] expert popularity per layer
    clusters: Clusters
    prompt: np.ndarray  # [S] prompt tokens per sequence
    decode: np.ndarray  # [S] generated tokens per sequence


def build_model(config: SynthConfig) -> SynthModel:
    meta = synth_metadata(config)
    rng = np.random.default_rng(config.seed)
    pop = layer_popularity(meta, config, rng)
    clusters = make_clusters(pop, _num_clusters(config, meta), rng)
    prompt, decode = sequence_lengths(config, rng)
    return SynthModel(meta, pop, clusters, prompt, decode)


def iter_synthetic(config: SynthConfig, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Iterator[TraceChunk]:
    """Yield the synthetic trace as chunks of exactly chunk_tokens tokens (the last may be shorter).

    The content does not depend on chunk_tokens. Memory is bounded by the chunk size.
    """
    from traces import synth_kernels as kern

    model = build_model(config)
    meta, pop, clusters, prompt, decode = model.meta, model.pop, model.clusters, model.prompt, model.decode
    pop_prob, pop_alias = (np.stack(t) for t in zip(*(alias_table(row) for row in pop), strict=True))
    num_layers, k = meta.num_moe_layers, meta.top_k
    slots = config.batch_size
    topic = np.zeros(slots, np.int64)
    prev = np.zeros((slots, num_layers, k), np.int64)
    has_prev = np.zeros(slots, np.bool_)
    key = np.uint64(kern.seed_key(config.seed))  # a Python int below 2**63 would type as int64
    noise_odds = kern.noise_odds_table(config.noise_scale)
    scoring = kern.SCORING_SIGMOID if meta.router_scoring == "sigmoid" else kern.SCORING_SOFTMAX
    num_groups, topk_groups = expert_groups(meta)

    def route(row0: int, seq: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(seq)
        ids = np.empty((n, num_layers, k), meta.id_dtype)
        weights = np.empty((n, num_layers, k), np.float32)
        tokens = np.empty(n, np.int32)
        for a in range(0, n, _KERNEL_BLOCK):
            b = min(a + _KERNEL_BLOCK, n)
            kern.route_rows(
                row0 + a, key, (seq[a:b] % slots).astype(np.int64), pos[a:b], pop, pop_prob, pop_alias,
                clusters.cluster_of, clusters.members, clusters.member_prob, clusters.member_alias,
                clusters.member_count, clusters.mass,
                config.cluster_weight, config.stickiness, config.topic_switch, noise_odds, scoring,
                meta.norm_topk_prob, meta.routed_scaling_factor, max(1, meta.vocab_size), num_groups,
                topk_groups, topic, prev, has_prev, ids[a:b], weights[a:b], tokens[a:b],
            )
        return ids, weights, tokens

    row0 = 0
    pending: list[tuple[np.ndarray, ...]] = []
    pending_rows = 0
    for piece in iter_layout(prompt, decode, config.batch_size, chunk_tokens):
        pending.append(piece)
        pending_rows += len(piece[0])
        while pending_rows >= chunk_tokens or (pending_rows and row0 + pending_rows == config.tokens):
            cols = [np.concatenate(c) for c in zip(*pending, strict=True)]
            take = min(chunk_tokens, pending_rows)
            seq, pos, phase, step = (c[:take] for c in cols)
            rest = [c[take:] for c in cols]
            pending = [tuple(rest)] if len(rest[0]) else []
            pending_rows -= take
            ids, weights, tokens = route(row0, seq, pos)
            row0 += take
            yield TraceChunk(
                seq_id=seq, position=pos, token_id=tokens if config.token_ids else None, phase=phase,
                step=step, expert_ids=ids, expert_weights=weights.astype(config.weights_dtype, copy=False),
            )


def synthesize(config: SynthConfig) -> tuple[TraceMetadata, TraceChunk]:
    """The whole synthetic trace in memory (the paired form of iter_synthetic; small traces and tests)."""
    chunks = list(iter_synthetic(config, chunk_tokens=min(config.tokens, DEFAULT_CHUNK_TOKENS)))
    return synth_metadata(config), TraceChunk.concat(chunks)


def write_synthetic(
    path: str | Path,
    config: SynthConfig,
    *,
    force: bool = False,
    compression: str | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    on_chunk: Callable[[int], None] | None = None,
    command_line: str = "",
) -> Path:
    """Synthesise straight to a trace file (atomic: written as .partial, renamed when complete)."""
    from datetime import datetime, timezone

    from traces.writer import open_writer

    meta = synth_metadata(config)
    meta.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta.command_line = command_line
    meta.tool_version = current_tool_version()
    with open_writer(path, meta, force=force, compression=compression) as writer:
        for chunk in iter_synthetic(config, chunk_tokens):
            writer.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk.num_tokens)
    return Path(path)
