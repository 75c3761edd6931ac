"""Plots for the report, drawn with matplotlib's object API (no pyplot state, no display) into PNG bytes.

Each function takes plain arrays and returns a report Figure. Shape legend: L MoE layers, E experts, S trace
segments, P placements or layouts, W refit intervals.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure as MplFigure

from simulator.report.model import Figure

DPI = 110
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
COMPONENT_COLORS = {"compute": "#1f77b4", "weights": "#ff7f0e", "dispatch": "#2ca02c", "combine": "#d62728",
                    "non_expert": "#7f7f7f"}


def _finish(fig: MplFigure, key: str, title: str, caption: str) -> Figure:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    png = buf.getvalue()
    # pixel size from the PNG's IHDR chunk (bytes 16-24), which rounding of inches x DPI may miss by one
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return Figure(key=key, title=title, caption=caption, png=png, width=width, height=height)


def _layer_ticks(ax, labels: Sequence[str], axis: str = "x") -> None:
    step = max(1, len(labels) // 16)
    idx = list(range(0, len(labels), step))
    if axis == "x":
        ax.set_xticks(idx, [labels[i] for i in idx])
    else:
        ax.set_yticks(idx, [labels[i] for i in idx])


def load_heatmap(load: np.ndarray, layer_names: Sequence[str]) -> Figure:
    """Per-layer expert load relative to the layer's mean. load: [L, E]."""
    load = load.astype(np.float64)
    mean = load.mean(axis=1, keepdims=True)
    rel = np.divide(load, mean, out=np.zeros_like(load), where=mean > 0)
    L, E = rel.shape
    fig = MplFigure(figsize=(9, max(2.2, 0.9 + 0.28 * L)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    _layer_ticks(ax, list(layer_names), "y")
    fig.colorbar(im, ax=ax, label="load / layer mean")
    return _finish(fig, "load-heatmap", "Expert load per layer",
                   f"Assignments to each of {E} experts in each of {L} MoE layers, relative to the layer's "
                   "mean (1 = an even share). Bright cells are hot experts that a placement must spread or "
                   "replicate.")


def entropy_gini(entropy_norm: np.ndarray, gini: np.ndarray, layer_names: Sequence[str]) -> Figure:
    """Normalised load entropy and Gini per layer. [L] each."""
    fig = MplFigure(figsize=(8, 3.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(layer_names))
    ax.plot(x, entropy_norm, marker="o", color=COLORS[0], label="entropy / log2(E)")
    ax.plot(x, gini, marker="s", color=COLORS[3], label="Gini")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("MoE layer")
    _layer_ticks(ax, list(layer_names))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside upper center", ncol=2, fontsize=8)  # above the axes, never over the points
    return _finish(fig, "entropy-gini", "Load entropy and Gini per layer",
                   "Normalised entropy is 1 when every expert gets the same load; Gini is 0 then and grows "
                   "toward 1 as load concentrates on few experts.")


def coselection(matrices: Sequence[np.ndarray], layers: Sequence[str]) -> Figure:
    """P(also chose j | chose i) for a few layers. matrices: each [E, E]."""
    n = len(matrices)
    fig = MplFigure(figsize=(3.6 * n + 0.8, 3.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    vmax = max(float(m.max()) for m in matrices) or 1.0
    im = None
    for ax, m, name in zip(axes, matrices, layers, strict=True):
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {name}")
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
    assert im is not None
    fig.colorbar(im, ax=list(axes), label="P(j | i)", fraction=0.03)
    return _finish(fig, "coselection", "Expert co-selection",
                   "Row i, column j: the share of tokens routed to expert i that also chose expert j in the "
                   "same layer. Bright off-diagonal cells are experts worth keeping on one GPU or node.")


def phases(prefill_entropy: np.ndarray, decode_entropy: np.ndarray, total_variation: np.ndarray,
           layer_names: Sequence[str], num_experts: int) -> Figure:
    """Entropy of each phase's load and their total variation distance, per layer. [L] each."""
    fig = MplFigure(figsize=(8, 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(layer_names))
    scale = np.log2(num_experts) if num_experts > 1 else 1.0
    ax.bar(x - 0.2, prefill_entropy / scale, width=0.4, color=COLORS[0], label="prefill entropy / log2(E)")
    ax.bar(x + 0.2, decode_entropy / scale, width=0.4, color=COLORS[1], label="decode entropy / log2(E)")
    if np.isfinite(total_variation).any():
        ax.plot(x, total_variation, marker="o", color="black", label="total variation prefill vs decode")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("MoE layer")
    _layer_ticks(ax, list(layer_names))
    fig.legend(loc="outside upper center", ncol=3, fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _finish(fig, "phases", "Prefill against decode",
                   "Load entropy of prompt (prefill) and generated (decode) tokens per layer, and the total "
                   "variation distance between the two load distributions (0: identical, 1: disjoint).")


def stability(segment_corr: np.ndarray, overlap: np.ndarray, independent: np.ndarray,
              layer_names: Sequence[str]) -> Figure:
    """Left: load correlation of each trace segment with the previous one, per layer ([S-1, L]).
    Right: experts shared with the previous token of the same sequence against independent routing ([L]
    each)."""
    fig = MplFigure(figsize=(10, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    if segment_corr.size:
        seg = np.arange(1, segment_corr.shape[0] + 1)
        for layer in range(segment_corr.shape[1]):
            left.plot(seg, segment_corr[:, layer], color=COLORS[layer % len(COLORS)], alpha=0.7,
                      label=f"layer {layer_names[layer]}" if segment_corr.shape[1] <= 8 else None)
        if segment_corr.shape[1] <= 8:
            left.legend(fontsize=7, loc="lower left", ncol=2)
        left.set_ylim(*zoom_limits(segment_corr))  # correlations sit just under 1: zoom to their spread
        left.yaxis.get_major_formatter().set_useOffset(False)
    left.set_xlabel("segment (vs the one before)")
    left.set_ylabel("load correlation")
    left.grid(alpha=0.3)
    x = np.arange(len(layer_names))
    right.bar(x - 0.2, overlap, width=0.4, color=COLORS[2], label="consecutive tokens")
    right.bar(x + 0.2, independent, width=0.4, color=COLORS[7], label="independent tokens")
    right.set_xlabel("MoE layer")
    right.set_ylabel("shared experts / K")
    _layer_ticks(right, list(layer_names))
    right.set_ylim(0, 1.2 * max(float(np.nanmax(overlap)) if np.isfinite(overlap).any() else 0.0,
                                float(np.nanmax(independent)), 0.01))
    right.legend(fontsize=8, ncol=2, loc="upper center")
    right.grid(alpha=0.3, axis="y")
    return _finish(fig, "stability", "Routing stability",
                   "Left: Pearson correlation of per-expert load between consecutive equal slices of the "
                   "trace (near 1: a placement fitted on one slice stays good on the next). Right: share of "
                   "its top-k experts a token shares with the previous token of its sequence, against the "
                   "share expected if tokens chose experts independently at the trace's rates.")


def zoom_limits(values: np.ndarray, min_span: float = 1e-3) -> tuple[float, float]:
    """y limits that show the spread of `values` (any shape, NaN ignored) with a margin on both sides, so a
    series near 1 is neither a flat line on the top edge nor lost in a range from 0; at least min_span
    tall."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    pad = max(0.15 * (high - low), min_span / 2)
    return low - pad, high + pad


def imbalance_vs_interval(every: Sequence[int], rebalanced: Sequence[float], fixed: Sequence[float],
                          oracle: Sequence[float], moved_bytes_per_step: Sequence[float]) -> Figure:
    """Step imbalance (simulator.metrics) against the refit interval W, with expert bytes moved per step. [W]
    each."""
    fig = MplFigure(figsize=(8, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(every, rebalanced, marker="o", color=COLORS[0], label="refit every W steps")
    ax.plot(every, fixed, linestyle="--", color=COLORS[3], label="fixed (fitted once)")
    ax.plot(every, oracle, linestyle=":", marker=".", color=COLORS[2],
            label="oracle (fitted on scored steps)")
    ax.set_xscale("log")
    ax.set_xlabel("refit interval W (steps)")
    ax.set_ylabel("step imbalance")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.bar(every, np.asarray(moved_bytes_per_step) / 2**20, width=np.asarray(every) * 0.25, alpha=0.25,
             color=COLORS[7], label="weights moved (MiB/step)")
    twin.set_ylabel("expert weights moved, MiB per step")
    lines, labels = ax.get_legend_handles_labels()
    l2, lab2 = twin.get_legend_handles_labels()
    # above the axes: inside, it hid the W = 1 point at the left edge
    fig.legend(lines + l2, labels + lab2, fontsize=8, loc="outside upper center", ncol=4)
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    return _finish(fig, "rebalance", "Imbalance against rebalance interval",
                   "Step imbalance (per step, the busiest GPU's load summed over layers and steps, over the "
                   "same sum of the mean GPU's) when the placement is refitted every W steps from the last N "
                   "steps' load, against a placement fitted once on the first window and an oracle fitted on "
                   "the scored steps themselves; bars: expert weight bytes moved per step, amortised over "
                   "the interval.")


def imbalance_over_time(series: Mapping[str, np.ndarray], max_points: int = 400) -> Figure:
    """Per-step imbalance (max/mean GPU load) for each placement. series: name -> [steps].

    Longer series are averaged over consecutive bins of steps so that up to max_points points per line remain
    legible; the caption says how many steps a point covers.
    """
    fig = MplFigure(figsize=(9, 3.4), layout="constrained")
    ax = fig.add_subplot()
    longest = max((len(v) for v in series.values()), default=0)
    per_point = max(1, -(-longest // max_points))  # ceil
    for i, (name, values) in enumerate(series.items()):
        v = np.asarray(values, dtype=np.float64)
        n = v.size // per_point * per_point
        binned = v[:n].reshape(-1, per_point).mean(axis=1) if n else v
        x = np.arange(binned.size) * per_point + (per_point - 1) / 2
        ax.plot(x, binned, color=COLORS[i % len(COLORS)], linewidth=1.0, label=name)
    ax.set_xlabel("scored step")
    ax.set_ylabel("max/mean GPU load")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=min(3, max(1, len(series))))
    binning = f" Each point is the mean of {per_point} consecutive steps." if per_point > 1 else ""
    return _finish(fig, "imbalance-over-time", "Per-step load imbalance",
                   "Each step's load imbalance (sum over layers of the busiest GPU's assignments over the "
                   f"sum of the mean) for every placement, on the scored part of the trace.{binning}")


def gpu_load_distribution(loads: Mapping[str, np.ndarray]) -> Figure:
    """Distribution of GPU loads relative to the mean, per placement. loads: name -> [L, G] expected loads."""
    fig = MplFigure(figsize=(8, 3.4), layout="constrained")
    ax = fig.add_subplot()
    names = list(loads)
    data = []
    for name in names:
        g = np.asarray(loads[name], dtype=np.float64)
        mean = g.mean(axis=-1, keepdims=True)
        data.append(np.divide(g, mean, out=np.ones_like(g), where=mean > 0).ravel())
    ax.boxplot(data, whis=(0, 100))
    ax.set_xticks(np.arange(1, len(names) + 1), names)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_ylabel("GPU load / mean (every layer)")
    ax.grid(alpha=0.3, axis="y")
    return _finish(fig, "gpu-load", "GPU load distribution",
                   "Expected load of every GPU in every layer (each expert's assignments split evenly among "
                   "its replicas) relative to the layer's mean GPU load, on the tokens after the fit part; "
                   "whiskers reach the extremes. The top whisker is what sets the step time.")


def node_traffic(names: Sequence[str], intra: Sequence[float], inter: Sequence[float]) -> Figure:
    """All-to-all bytes per step inside nodes (scale-up) and between nodes (scale-out), per placement. [P]
    each."""
    fig = MplFigure(figsize=(8, 3.4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x - 0.2, np.asarray(intra) / 2**20, width=0.4, color=COLORS[0], label="inside nodes (scale-up)")
    ax.bar(x + 0.2, np.asarray(inter) / 2**20, width=0.4, color=COLORS[3], label="between nodes (scale-out)")
    ax.set_xticks(x, names)
    ax.set_ylabel("MiB per step (dispatch + combine)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _finish(fig, "node-traffic", "All-to-all traffic between nodes",
                   "Bytes moved by dispatch and combine per step: between GPUs of one node over the scale-up "
                   "links, and between nodes over the network, per placement.")


def traffic_tradeoff(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                     points: Mapping[str, tuple[float, float]]) -> Figure:
    """All-to-all bytes per token against step imbalance. curves: label -> (step imbalances, bytes) of a
    policy fitted at rising step budgets under one dispatch model; points: label -> (step imbalance, bytes) of
    a policy without a budget."""
    fig = MplFigure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    policies = list(dict.fromkeys(label.split(" (")[0] for label in curves))  # one colour per policy
    for label, (imb, nbytes) in curves.items():
        style = "--" if label.endswith("(stay)") else "-"
        color = COLORS[policies.index(label.split(" (")[0]) % len(COLORS)]
        ax.plot(imb, np.asarray(nbytes) / 2**10, style, marker="o", ms=4, color=color, label=label)
    for j, (label, (imb1, nbytes1)) in enumerate(points.items()):
        ax.scatter([imb1], [nbytes1 / 2**10], marker="s", s=40, color="black" if j == 0 else COLORS[-1],
                   zorder=3, label=label)
    ax.set_xlabel("step imbalance")
    ax.set_ylabel("all-to-all KiB per token (dispatch + combine)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _finish(fig, "traffic-tradeoff", "All-to-all bytes against step imbalance",
                   "Each curve is one traffic-aware policy fitted at rising step budgets (left to right: the "
                   "sampled steps' load may grow more over the balanced start's), scored on the tokens after "
                   "the fit part with tokens returning home after every layer (solid) or staying on the GPU "
                   "of their top-1 expert (dashed); squares are policies without a budget. Down and left is "
                   "better.")


def time_breakdown(names: Sequence[str], parts: Mapping[str, Sequence[float]],
                   highlight: int | None = None) -> Figure:
    """Stacked MoE time per step by component for each layout. parts: component -> [P] seconds; highlight: the
    index of the recommended layout, outlined and labelled."""
    fig = MplFigure(figsize=(max(6.0, 0.7 * len(names) + 3), 3.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for comp, values in parts.items():
        v = np.asarray(values, dtype=np.float64) * 1e3
        ax.bar(x, v, bottom=bottom, color=COMPONENT_COLORS[comp], label=comp.replace("_", "-"))
        bottom += v
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    marked = ""
    if highlight is not None:
        ax.bar([highlight], [bottom[highlight]], fill=False, edgecolor="black", linewidth=2.0, zorder=3)
        ax.annotate("recommended", (highlight, bottom[highlight]), xytext=(0, 4), textcoords="offset points",
                    ha="center", fontsize=8, fontweight="bold")
        ax.get_xticklabels()[highlight].set_fontweight("bold")
        ax.set_ylim(0, 1.12 * float(bottom.max()))  # room for the label
        marked = " The recommended layout is outlined."
    ax.set_ylabel("ms per step")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    return _finish(fig, "time-breakdown", "Step time breakdown",
                   "Predicted time per step split into expert compute, expert weight reads (each layer "
                   "counts as whichever bounds its slowest GPU), dispatch and combine, plus the non-expert "
                   "work (attention, dense layers, embeddings) where the layouts come from the "
                   f"plan.{marked}")
