"""Synthetic traces: the Numba kernel against a plain NumPy reference, determinism, layout and realism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from traces import InputError, open_trace
from traces.synth_kernels import alias_table, noise_odds_table
from traces.synthetic import (
    SynthConfig,
    build_model,
    expert_groups,
    iter_synthetic,
    load_counts,
    make_clusters,
    synthesize,
    write_synthetic,
)

COUNTS = Path(__file__).resolve().parents[1] / "data" / "olmoe_expert_counts.json"
M64 = (1 << 64) - 1


# ---------------------------------------------------------------- NumPy reference of synth_kernels.route_rows
def _mix(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _pair(stream: int, i: int) -> tuple[float, float]:
    x = _mix((stream + i * 0x9E3779B97F4A7C15) & M64)
    return (x >> 32) / 2**32, (x & 0xFFFFFFFF) / 2**32


def _unit(stream: int, i: int) -> float:
    return (_mix((stream + i * 0x9E3779B97F4A7C15) & M64) >> 11) / 2**53


def _alias(prob: np.ndarray, alias: np.ndarray, n: int, v: float) -> int:
    x = v * n
    j = min(int(x), n - 1)
    return j if x - j < prob[j] else int(alias[j])


def reference_trace(config: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [T, L, K], weights [T, L, K] (float64), token ids [T] by plain Python, row by row."""
    model = build_model(config)
    meta, pop, cl = model.meta, model.pop, model.clusters
    chunks = list(iter_synthetic(config, chunk_tokens=config.tokens))
    seq, pos = chunks[0].seq_id, chunks[0].position
    assert seq is not None and pos is not None
    num_layers, num_experts, k = meta.num_moe_layers, meta.num_experts, meta.top_k
    num_clusters = cl.members.shape[1]
    num_groups, topk_groups = expert_groups(meta)
    group_size = num_experts // num_groups
    tables = [alias_table(row) for row in pop]
    odds_table = noise_odds_table(config.noise_scale)
    key = _mix(config.seed)
    topic: dict[int, int] = {}
    prev: dict[int, np.ndarray] = {}
    ids = np.zeros((len(seq), num_layers, k), np.int64)
    weights = np.zeros((len(seq), num_layers, k))
    tokens = np.zeros(len(seq), np.int64)
    for row in range(len(seq)):
        s = int(seq[row])
        c = _mix(key ^ (row * (num_layers + 1) + num_layers))
        if pos[row] == 0:
            prev.pop(s, None)
            topic[s] = int(_unit(c, 0) * num_clusters)
        elif _unit(c, 0) < config.topic_switch:
            topic[s] = int(_unit(c, 1) * num_clusters)
        tokens[row] = int(_unit(c, 2) * meta.vocab_size)
        tp = topic[s]
        sticky = config.stickiness if s in prev else 0.0
        w_cl = config.cluster_weight + config.stickiness - sticky
        w_gl = 1.0 - sticky - w_cl
        routed = np.zeros((num_layers, k), np.int64)
        for layer in range(num_layers):
            c = _mix(key ^ (row * (num_layers + 1) + layer))
            members = cl.members[layer, tp, : cl.member_count[layer, tp]]
            mixture = w_gl * pop[layer] + w_cl * np.where(cl.cluster_of[layer] == tp, pop[layer],
                                                          0.0) / cl.mass[layer, tp]
            if sticky:
                mixture = mixture + sticky * np.bincount(prev[s][layer], minlength=num_experts) / k
            i, chosen = 0, list[int]()
            while len(chosen) < k:
                u, v = _pair(c, i)
                i += 1
                if u < sticky:
                    e = int(prev[s][layer][min(int(v * k), k - 1)])
                elif u < sticky + w_cl:
                    e = int(members[_alias(cl.member_prob[layer, tp], cl.member_alias[layer, tp],
                                           len(members), v)])
                else:
                    e = _alias(*tables[layer], num_experts, v)
                groups = {x // group_size for x in chosen}
                if e not in chosen and (len(groups) < topk_groups or e // group_size in groups):
                    chosen.append(e)
            q = np.empty(k)
            for j, e in enumerate(chosen):
                odds = odds_table[min(int(_pair(c, i)[0] * len(odds_table)), len(odds_table) - 1)]
                i += 1
                q[j] = (mixture[e] * odds if meta.router_scoring == "softmax"
                        else 1 / (1 + 1 / (mixture[e] * num_experts * odds)))
            if meta.norm_topk_prob:
                w = q / q.sum()
            elif meta.router_scoring == "softmax":
                w = q / (q.sum() + max(0.0, 1.0 - mixture[chosen].sum()))
            else:
                w = q
            order = np.argsort(-w, kind="stable")
            ids[row, layer] = np.asarray(chosen)[order]
            weights[row, layer] = w[order] * meta.routed_scaling_factor
            routed[layer] = ids[row, layer]
        prev[s] = routed
    return ids, weights, tokens


@pytest.mark.parametrize(
    "config",
    [
        SynthConfig(tokens=300, seed=7, sequences=5, batch_size=2),
        SynthConfig(tokens=200, seed=3, model="deepseek-v3", sequences=3, weights_dtype="float32"),
        SynthConfig(tokens=200, seed=4, model="mixtral-8x7b", sequences=2, stickiness=0.5,
                    cluster_weight=0.4),
        SynthConfig(tokens=150, seed=5, model="qwen1.5-moe-a2.7b", counts=None, skew=0.0,
                    decode_fraction=0.5),
        SynthConfig(tokens=150, seed=6, model="deepseek-v3", sequences=2, stickiness=0.6, skew=0.0),
        SynthConfig(tokens=150, seed=8, model="gpt-oss-20b", sequences=2),
    ],
    ids=["olmoe", "deepseek-sigmoid", "mixtral-sticky", "qwen-uniform", "deepseek-groups-sticky", "gpt-oss"],
)
def test_kernel_matches_numpy_reference(config: SynthConfig) -> None:
    _, chunk = synthesize(config)
    ids, weights, tokens = reference_trace(config)
    np.testing.assert_array_equal(chunk.expert_ids, ids)
    np.testing.assert_array_equal(chunk.token_id, tokens)
    assert chunk.expert_weights is not None
    np.testing.assert_allclose(chunk.expert_weights.astype(np.float64), weights,
                               rtol=2e-3 if config.weights_dtype == "float16" else 1e-6)


def test_alias_table_draws_the_given_distribution() -> None:
    p = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    prob, alias = alias_table(p)
    v = (np.arange(100_000) + 0.5) / 100_000  # evenly spaced uniforms: exact frequencies up to 1e-5
    x = v * len(p)
    j = np.minimum(x.astype(int), len(p) - 1)
    draws = np.where(x - j < prob[j], j, alias[j])
    np.testing.assert_allclose(np.bincount(draws, minlength=len(p)) / len(v), p, atol=1e-4)


# ---------------------------------------------------------------- determinism and layout
def test_same_seed_same_trace_whatever_the_chunking() -> None:
    config = SynthConfig(tokens=5000, seed=11, sequences=7, batch_size=3)
    whole = synthesize(config)[1]
    pieces = list(iter_synthetic(config, chunk_tokens=333))
    assert all(p.num_tokens == 333 for p in pieces[:-1]) and pieces[-1].num_tokens <= 333
    for name, value in whole.present().items():
        np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in pieces]), value, err_msg=name)
    other = synthesize(SynthConfig(tokens=5000, seed=12, sequences=7, batch_size=3))[1]
    assert other.expert_ids is not None and whole.expert_ids is not None
    assert not np.array_equal(other.expert_ids, whole.expert_ids)


def test_layout_is_what_a_batched_recorder_writes() -> None:
    config = SynthConfig(tokens=10_000, seed=2, sequences=10, batch_size=4, decode_fraction=0.3)
    model = build_model(config)
    c = synthesize(config)[1]
    assert c.seq_id is not None and c.position is not None and c.phase is not None and c.step is not None
    assert c.num_tokens == 10_000 and len(np.unique(c.seq_id)) == 10
    assert int((model.prompt + model.decode).sum()) == 10_000
    assert abs(float(c.phase.mean()) - 0.3) < 0.01
    assert np.all(np.diff(c.step) >= 0)  # rows in forward-pass order
    batches = (c.seq_id // 4)
    for b in np.unique(batches):
        rows = batches == b
        prefill_steps = np.unique(c.step[rows & (c.phase == 0)])
        assert len(prefill_steps) == 1  # one prefill pass per batch
        decode = rows & (c.phase == 1)
        steps, per_step = np.unique(c.step[decode], return_counts=True)
        assert steps[0] == prefill_steps[0] + 1 and np.all(np.diff(steps) == 1)
        assert per_step.max() <= 4  # one token per running sequence per decode step
    for s in range(10):
        pos = c.position[c.seq_id == s]
        np.testing.assert_array_equal(pos, np.arange(len(pos)))  # positions run 0.. in file order
        assert np.all(c.phase[c.seq_id == s][: model.prompt[s]] == 0)


@pytest.mark.parametrize("model", ["olmoe-1b-7b", "mixtral-8x7b", "qwen1.5-moe-a2.7b", "deepseek-v3",
                                   "qwen3-30b-a3b", "gpt-oss-120b", "gpt-oss-20b"])
def test_rows_are_valid_top_k_with_router_like_weights(model: str) -> None:
    meta, c = synthesize(SynthConfig(model=model, tokens=400, seed=1))
    assert c.expert_ids is not None and c.expert_weights is not None
    ids = c.expert_ids.astype(np.int64)
    assert ids.max() < meta.num_experts
    srt = np.sort(ids, axis=-1)
    assert not np.any(srt[..., 1:] == srt[..., :-1])  # no duplicate expert in a row
    w = c.expert_weights.astype(np.float64)
    assert np.all(w > 0) and np.all(np.diff(w, axis=-1) <= 0)  # router order: descending weight
    groups, topk_groups = expert_groups(meta)
    group_count = np.array([[len(np.unique(row // (meta.num_experts // groups))) for row in token]
                            for token in ids])
    assert group_count.max() <= topk_groups  # DeepSeek-V3: every token's 8 experts in at most 4 of 8 groups
    if groups > 1:
        assert group_count.max() == topk_groups  # the limit binds: without it 8 experts would span 5-8 groups
    total = w.sum(-1)
    if meta.norm_topk_prob:  # Mixtral, Qwen3-MoE, GPT-OSS; DeepSeek-V3 then x2.5
        np.testing.assert_allclose(total, meta.routed_scaling_factor, rtol=5e-3)
    else:  # un-renormalised softmax probabilities
        assert np.all(total < 1.0) and 0.2 < total.mean() < 0.95


# ---------------------------------------------------------------- realism
def _loads(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] share of assignments per expert."""
    out = np.stack([np.bincount(ids[:, layer].ravel(), minlength=num_experts)
                    for layer in range(ids.shape[1])])
    return out / out.sum(axis=1, keepdims=True)


def _entropy(share: np.ndarray) -> np.ndarray:
    return -(share * np.log(np.maximum(share, 1e-300))).sum(-1) / np.log(share.shape[-1])


def test_skew_controls_load_imbalance() -> None:
    entropies = []
    for skew in (0.0, 0.8, 1.6):
        meta, c = synthesize(SynthConfig(tokens=4000, seed=5, skew=skew, cluster_weight=0.0, stickiness=0.0))
        assert c.expert_ids is not None
        entropies.append(_entropy(_loads(c.expert_ids, meta.num_experts)).mean())
    assert entropies[0] > 0.99 > entropies[1] > entropies[2]


def test_counts_file_sets_popularity() -> None:
    table = load_counts(COUNTS)
    config = SynthConfig(tokens=6000, seed=3, counts=table, cluster_weight=0.0, stickiness=0.0)
    model = build_model(config)
    meta, c = synthesize(config)
    assert c.expert_ids is not None
    share = _loads(c.expert_ids, meta.num_experts)
    for row, layer in enumerate(table.layers):  # counted layers keep their real expert ids and shares
        real = table.counts[row] / table.counts[row].sum()
        assert np.corrcoef(share[layer], real)[0, 1] > 0.99
        assert share[layer].max() == pytest.approx(real.max(), rel=0.05)  # the hottest expert is not capped
        assert _entropy(share[layer]) == pytest.approx(_entropy(real), abs=0.01)
    # An uncounted layer has its nearest counted layer's skew with other hot experts.
    np.testing.assert_allclose(np.sort(model.pop[1]), np.sort(model.pop[0]))
    assert not np.array_equal(model.pop[1], model.pop[0])


def test_counts_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": [0], "counts": [[1, 2, 3]]}))
    with pytest.raises(InputError, match="3 experts per layer"):
        build_model(SynthConfig(tokens=10, counts=load_counts(bad)))
    bad.write_text("not json")
    with pytest.raises(InputError, match="not a JSON counts file"):
        load_counts(bad)
    with pytest.raises(InputError, match="no domain"):
        load_counts(COUNTS, domain="poetry")


def test_co_selected_experts_come_from_clusters() -> None:
    config = SynthConfig(tokens=6000, seed=9, skew=0.0, cluster_weight=0.4, stickiness=0.0)
    model = build_model(config)
    all_ids = synthesize(config)[1].expert_ids
    assert all_ids is not None
    ids = all_ids[:, 0].astype(np.int64)  # layer 0: [T, K]
    e = model.meta.num_experts
    onehot = np.zeros((len(ids), e))
    np.put_along_axis(onehot, ids, 1.0, axis=1)
    together = onehot.T @ onehot / len(ids)  # [E, E] P(both chosen)
    single = onehot.mean(0)
    lift = together / np.outer(single, single)
    same = model.clusters.cluster_of[0][:, None] == model.clusters.cluster_of[0][None, :]
    off_diag = ~np.eye(e, dtype=bool)
    assert lift[same & off_diag].mean() > 1.5 * lift[~same].mean()


def test_clusters_split_popularity_evenly() -> None:
    pop = np.random.default_rng(0).permutation(np.arange(1, 65) ** -0.8)[None, :]
    pop /= pop.sum()
    clusters = make_clusters(pop, 8, np.random.default_rng(1))
    np.testing.assert_array_equal(np.sort(np.concatenate(
        [clusters.members[0, c, : clusters.member_count[0, c]] for c in range(8)])), np.arange(64))
    assert clusters.mass[0].max() / clusters.mass[0].min() < 1.2  # topics drawn uniformly keep the skew
    for c in range(8):
        np.testing.assert_allclose(clusters.mass[0, c], pop[0, clusters.cluster_of[0] == c].sum())


def test_consecutive_tokens_share_experts() -> None:
    def overlap(stickiness: float) -> float:
        c = synthesize(SynthConfig(tokens=3000, seed=4, sequences=1, skew=0.0, cluster_weight=0.0,
                                   stickiness=stickiness))[1]
        assert c.expert_ids is not None
        ids = np.sort(c.expert_ids[:, 0].astype(np.int64), axis=-1)
        return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids[1:], ids[:-1], strict=True)]))

    assert overlap(0.5) > 2.0 * overlap(0.0)  # uniform 8 of 64 expects 1 shared expert


def test_bad_config_is_input_error() -> None:
    with pytest.raises(InputError, match="--decode-fraction"):
        SynthConfig(decode_fraction=1.0)
    with pytest.raises(InputError, match="unknown model preset"):
        SynthConfig(model="gpt-5")
    with pytest.raises(InputError, match="--sequences"):
        SynthConfig(tokens=5, sequences=6)


@pytest.mark.parametrize("suffix", [".h5", ".arrow"])
def test_write_synthetic_reads_back(tmp_path: Path, suffix: str) -> None:
    config = SynthConfig(tokens=3000, seed=6)
    path = write_synthetic(tmp_path / f"t{suffix}", config, chunk_tokens=1000)
    with open_trace(path) as trace:
        assert trace.complete and trace.metadata.source == "synthetic"
        back = trace.read_all()
    whole = synthesize(config)[1]
    for name, value in whole.present().items():
        np.testing.assert_array_equal(getattr(back, name), value, err_msg=name)
