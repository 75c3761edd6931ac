"""build_report(): results of plan, replay, rebalance and routing analysis -> a Report (tables, plots,
numbers).

Pure: takes results already computed (collect.py runs them over a trace) and returns data; render.py writes
it. Shape legend: L MoE layers, E experts, G GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator import cost_model, metrics
from simulator.hardware import GpuSpec
from simulator.placement import expected_gpu_load
from simulator.plan import PlanResult
from simulator.rebalance import RebalanceAdvice, RebalanceResult, advise
from simulator.rebalance.render import LEGEND as REBALANCE_LEGEND
from simulator.rebalance.render import step_time
from simulator.rebalance.result import UNIT_PRICES
from simulator.replay import ReplayResult
from simulator.report import figures
from simulator.report.format import fmt_bytes, fmt_int, fmt_ms, fmt_num, fmt_pct
from simulator.report.model import Report, Section, Table
from simulator.report.plan_section import plan_section, time_breakdown_figure
from simulator.report.traffic_section import traffic_section
from simulator.routing_analysis import RoutingAnalysis
from simulator.traffic.tradeoff import TradeoffCurve
from traces.presets import PRESETS
from traces.schema import PHASE_NAMES, TraceMetadata

SECTION_KEYS = ("recommendation", "layouts", "traffic", "rebalance", "routing", "inputs")
COSELECTION_LAYERS = 3  # co-selection matrices drawn: first, middle and last MoE layer
# expert pairs listed only if at least this share of tokens chose both (lift is noisy below)
PAIR_MIN_SHARE = 0.005


@dataclass(frozen=True)
class StepBasis:
    """The step size the replay and rebalance sections use, and where it comes from.

    source: "recommendation" or "frontier" (the plan's chosen point: its batch), "fallback" (a plan with no
    point that fits memory), "option" (--tokens-per-step, no plan) or "recorded" (the trace's forward passes,
    no plan).
    """

    source: str = "recorded"
    tokens_per_step: int = 0  # 0: the recorded forward passes
    tokens_per_gpu: int = 0  # the plan point's per-GPU batch (0: not a per-GPU batch)
    num_gpus: int = 0
    layout: str = ""  # the plan point, described (empty without a plan)

    def size(self) -> str:
        """The step size in words, e.g. "4,096 tokens per step (512 per GPU x 8 GPUs)"."""
        if self.tokens_per_step == 0:
            return "the trace's recorded forward passes"
        per_gpu = (f" ({fmt_int(self.tokens_per_gpu)} per GPU x {self.num_gpus} GPUs)" if self.tokens_per_gpu
                   else "")
        return f"{fmt_int(self.tokens_per_step)} tokens per step{per_gpu}"

    def sentence(self) -> str:
        """One sentence for the replay and rebalance sections: which step size they use and why."""
        regrouped = (", each phase's tokens regrouped into steps of their own as the plan does"
                     if self.tokens_per_step else "")
        if self.source == "recommendation":
            return f"Steps are the recommended layout's batch, {self.size()}{regrouped}."
        if self.source == "frontier":
            return ("No layout meets the goal, so steps are the batch of the frontier point with the "
                    f"highest throughput ({self.layout}): {self.size()}{regrouped}.")
        if self.source == "fallback":
            return ("No layout in the plan fits in memory, so no planned batch is replayed: steps are "
                    f"{self.size()}{regrouped}.")
        if self.source == "option":
            return (f"Steps are {self.size()} (--tokens-per-step){regrouped}; no throughput target, so no "
                    "plan.")
        return (f"Steps are {self.size()}: no throughput target was given, so no batch was planned "
                "(pass --target-tokens-per-s to replay at the recommended batch).")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "tokens_per_step": self.tokens_per_step,
                "tokens_per_gpu": self.tokens_per_gpu, "num_gpus": self.num_gpus, "layout": self.layout,
                "text": self.sentence()}


@dataclass
class ReportInputs:
    """Everything the report shows, computed already."""

    trace_paths: list[str]
    metadata: TraceMetadata
    num_tokens: int
    routing: RoutingAnalysis
    replay: ReplayResult
    rebalance: list[RebalanceResult]
    hardware: list[GpuSpec]
    plan: PlanResult | None = None  # None when no throughput target was given
    settings: dict[str, Any] = field(default_factory=dict)  # the command's options, shown under Inputs
    created_at: str = ""
    step_basis: StepBasis | None = None  # None: the replay's own tokens_per_step, no plan point behind it
    rebalance_advice: RebalanceAdvice | None = None  # None: advise() with the default margin
    traffic: TradeoffCurve | None = None  # None: the traffic section says it was not computed

    def steps(self) -> StepBasis:
        if self.step_basis is not None:
            return self.step_basis
        tps = int(self.replay.config.get("tokens_per_step", 0))
        return StepBasis(source="option" if tps else "recorded", tokens_per_step=tps)


# --------------------------------------------------------------------------------------------------- sections


def _recommendation_section(inputs: ReportInputs) -> Section:
    return plan_section(inputs.plan, inputs.replay)


def _scored_load(inputs: ReportInputs) -> np.ndarray:
    """[L, E] load of the tokens the replay scored: the phase's load minus the part the placements were fitted
    on."""
    phase = inputs.replay.config.get("phase", "all")
    routing = inputs.routing
    total = routing.load if phase == "all" else routing.phase_load[{v: k
                                                                    for k, v in PHASE_NAMES.items()}[phase]]
    fit = inputs.replay.fit_load
    if fit is None or inputs.replay.score_start == 0:
        return total
    return np.maximum(total - fit, 0)


def _layouts_section(inputs: ReportInputs) -> Section:
    replay = inputs.replay
    cfg = replay.config
    hw = cfg["hardware"]["name"]
    gpus, gpn = cfg["num_gpus"], cfg["gpus_per_node"]
    nodes = max(1, gpus // gpn)
    rows = []
    for p in replay.placements:
        t = p.timings[0]
        rows.append([
            p.label, fmt_num(p.step_imbalance), fmt_num(p.aggregate_imbalance),
            fmt_num(p.step_imbalance_percentiles["p95"]), fmt_num(p.step_imbalance_percentiles["p99"]),
            fmt_num(p.sglang_balancedness), fmt_num(p.vllm_balancedness),
            fmt_pct(p.leave_gpu_share), fmt_pct(p.leave_node_share),
            fmt_bytes(p.all_to_all_bytes_per_step), fmt_ms(t.step_time["mean"]),
            fmt_int(t.tokens_per_s_per_gpu),
            f"{fmt_bytes(t.expert_memory_bytes)} ({fmt_pct(t.expert_memory_share)})",
            fmt_pct(p.dropped_share, 2),
        ])
    table = Table(
        columns=["placement", "step imbalance", "aggregate imbalance", "step p95", "step p99",
                 "SGLang balancedness", "vLLM balancedness", "leave GPU", "leave node", "all-to-all / step",
                 "MoE ms / step", "tokens/s / GPU", "expert memory / GPU (of HBM)", "dropped"],
        rows=rows, numeric=[False] + [True] * 13,
        caption=f"Placements on {gpus} x {hw} ({nodes} node{'s' if nodes > 1 else ''} of {min(gpn, gpus)}), "
                f"steps: {inputs.steps().size()}",
        legend=f"{metrics.STEP_IMBALANCE}; {metrics.AGGREGATE_IMBALANCE}; step p95 / p99: percentiles of "
               f"each step's own imbalance; {metrics.SGLANG_BALANCEDNESS}; {metrics.VLLM_BALANCEDNESS}; "
               "leave GPU / node: share of assignments served off the token's GPU / node; MoE ms: mean "
               "predicted time per step of the MoE layers; dropped: assignments over the capacity factor",
    )
    series = {p.label: np.asarray(p.step_imbalance_series) for p in replay.placements}
    scored = _scored_load(inputs)
    gpu_loads = {label: expected_gpu_load(pl, scored)
                 for label, pl in zip((p.label for p in replay.placements), replay.fitted_placements,
                                      strict=True)}
    labels = [p.label for p in replay.placements]
    figs = [
        figures.imbalance_over_time(series),
        figures.gpu_load_distribution(gpu_loads),
        figures.node_traffic(labels, [p.scale_up_bytes_per_step for p in replay.placements],
                             [p.scale_out_bytes_per_step for p in replay.placements]),
    ]
    figs.append(time_breakdown_figure(inputs.plan, replay))
    fit_share = replay.fit_tokens / max(replay.total_tokens, 1)
    paragraphs = [
        f"Each placement was fitted on the first {fmt_int(replay.fit_tokens)} tokens ({fmt_pct(fit_share)} "
        f"of the trace) and scored on the remaining {fmt_int(replay.total_tokens - replay.score_start)}, so "
        "no placement is scored on the tokens it was fitted to. Step imbalance, the headline, sums each "
        "step's busiest GPU load over layers and steps and divides by the same sum of the mean GPU's, so it "
        "tracks step time; the aggregate imbalance treats the whole scored part as one step and cannot see "
        "load moving between steps.",
        f"{inputs.steps().sentence()} Per-step imbalance, traffic and time are for steps of "
        f"{fmt_int(_mean_step_tokens(replay))} tokens on average ({fmt_int(_scored_steps(replay))} scored "
        "steps).",
        "Within each step, an expert's tokens split over its replicas by the "
        f"{cfg.get('dispatch', 'static')} dispatch policy (--dispatch).",
    ]
    if inputs.steps().tokens_per_step and cfg.get("phase", "all") == "all":
        paragraphs.append("With steps regrouped by phase, the per-step imbalance plot shows the prefill "
                          "steps in trace order, then the decode steps.")
    if nodes == 1:
        paragraphs.append("This layout is one node: all of its all-to-all traffic stays on the scale-up "
                          "links, none crosses the network between nodes.")
    return Section("layouts", "Placements and layouts", paragraphs, [table], figs)


def _mean_step_tokens(replay: ReplayResult) -> float:
    p = replay.placements[0]
    return p.tokens / max(p.steps, 1)


def _scored_steps(replay: ReplayResult) -> int:
    return replay.placements[0].steps


def _rebalance_section(inputs: ReportInputs) -> Section:
    results = inputs.rebalance
    if not results:
        return Section("rebalance", "Rebalance windows", ["No rebalance replay was run."])
    first = results[0]
    advice = inputs.rebalance_advice or advise(results)
    rows = []
    for r in results:
        rows.append([
            str(r.every), str(r.rebalances), fmt_num(r.step_imbalance("rebalanced")),
            fmt_num(r.percentile("rebalanced", 95)), fmt_num(r.step_imbalance("fixed")),
            fmt_num(r.step_imbalance("oracle")), fmt_num(r.sglang_balancedness("rebalanced")),
            fmt_num(r.vllm_balancedness("rebalanced")),
            fmt_bytes(float(r.moved_bytes.mean())) if r.rebalances else "0 B", step_time(r),
            f"{-r.gain():+.1%}",
        ])
    hw = "" if first.prices.hardware == UNIT_PRICES else f" on {first.prices.hardware}"
    table = Table(
        columns=["refit every W steps", "refits", "step imbalance", "step p95", "fixed", "oracle",
                 "SGLang balancedness", "vLLM balancedness", "weights moved / refit",
                 "time / step with moves", "vs fixed"],
        rows=rows, numeric=[True] * 11,
        caption=f"Refit from the last N = {first.window} steps with the {first.settings.get('policy', '?')} "
                f"policy on {first.settings.get('num_gpus', '?')} GPUs{hw}; steps: {inputs.steps().size()}",
        legend=REBALANCE_LEGEND,
    )
    fig = figures.imbalance_vs_interval(
        [r.every for r in results], [r.step_imbalance("rebalanced") for r in results],
        [r.step_imbalance("fixed") for r in results], [r.step_imbalance("oracle") for r in results],
        [float(r.moved_bytes.sum()) / max(r.scored_steps, 1) for r in results],
    )
    paragraphs = [
        ("Refit: " if advice.every is not None else "Don't refit: ") + advice.reason + ".",
        f"The trace has {first.steps} steps; the first {first.window} are the window the first placement is "
        "fitted on and are not scored. The fixed placement keeps that first fit; the oracle is refitted on "
        "each interval's own steps (hindsight), the floor a refit could reach. One expert's weights are "
        f"{fmt_bytes(first.expert_bytes)}.",
        inputs.steps().sentence(),
    ]
    return Section("rebalance", "Rebalance windows", paragraphs, [table], [fig])


def _routing_section(inputs: ReportInputs) -> Section:
    ra = inputs.routing
    names = ra.layer_names
    ent, ent_n, gini, mom = ra.entropy(), ra.normalized_entropy(), ra.gini(), ra.max_over_mean()
    top = ra.top_experts(5)
    phases = ra.phase_comparison()
    stab = ra.stability()
    rows = []
    for i, name in enumerate(names):
        seg = stab["segment_correlation"][:, i] if stab["segment_correlation"].size else np.array([np.nan])
        rows.append([
            name, fmt_num(ent[i], 2), fmt_num(ent_n[i]), fmt_num(gini[i]), fmt_num(mom[i], 2),
            ", ".join(f"{e} ({fmt_pct(s)})" for e, s in top[i]),
            fmt_num(phases["total_variation"][i]),
            fmt_num(float(np.nanmin(seg)) if np.isfinite(seg).any() else np.nan),
            fmt_pct(stab["consecutive_overlap"][i]), fmt_pct(stab["independent_overlap"][i]),
        ])
    table = Table(
        columns=["layer", "entropy (bits)", "entropy / log2 E", "Gini", "max / mean", "top experts (share)",
                 "TV prefill-decode", "min segment corr.", "shared w/ prev. token", "if independent"],
        rows=rows, numeric=[False, True, True, True, True, False, True, True, True, True],
        caption="Per-layer routing statistics",
        legend="entropy: of the layer's expert load, in bits (log2 E when even); Gini: 0 even, toward 1 when "
               "few experts take the load; max / mean: the busiest expert's load over the mean; TV "
               "prefill-decode: total variation distance between the two phases' loads (0 same, 1 disjoint); "
               "min segment corr.: the lowest load correlation between consecutive equal slices of the "
               "trace; shared w/ prev. token: share of its top-k a token shares with the previous token of "
               "its sequence, against what independent choices at the trace's rates would give",
    )
    shown = sorted({0, ra.num_layers // 2, ra.num_layers - 1})[:COSELECTION_LAYERS]
    pair_rows = []
    for layer in shown:
        for by in ("count", "lift"):
            for i, j, count, lift in ra.top_pairs(layer, 3, by=by, min_share=PAIR_MIN_SHARE):
                pair_rows.append([names[layer], "most frequent" if by == "count" else "most above chance",
                                  f"{i} + {j}", fmt_int(count), fmt_pct(count / max(ra.num_tokens, 1)),
                                  fmt_num(lift, 2)])
    pairs = Table(columns=["layer", "ranked by", "experts", "tokens choosing both", "of tokens",
                           "lift over independent"], rows=pair_rows,
                  numeric=[False, False, False, True, True, True],
                  caption=f"Expert pairs (pairs chosen by at least {fmt_pct(PAIR_MIN_SHARE)} of tokens; lift "
                          "1 = as often as independent choices would give)",
                  legend="tokens choosing both: tokens whose top-k in the layer holds both experts; lift: "
                         "that count over what the two experts' separate rates would give if tokens chose "
                         "independently")
    figs = [
        figures.load_heatmap(ra.load, names),
        figures.entropy_gini(ent_n, gini, names),
        figures.coselection([ra.coselection_conditional(layer) for layer in shown],
                            [names[i] for i in shown]),
        figures.phases(phases["prefill_entropy"], phases["decode_entropy"], phases["total_variation"], names,
                       ra.num_experts),
        figures.stability(stab["segment_correlation"], stab["consecutive_overlap"],
                          stab["independent_overlap"], names),
    ]
    paragraphs = [
        f"{fmt_int(ra.num_tokens)} tokens ({fmt_int(phases['prefill_tokens'])} prefill, "
        f"{fmt_int(phases['decode_tokens'])} decode), {ra.num_layers} MoE layers of {ra.num_experts} "
        f"experts, top-{ra.top_k}. Statistics follow the OLMoE paper's routing analysis: how evenly load "
        "spreads over experts, which experts tokens choose together, and how routing changes over the trace.",
        f"Stability: the trace is cut into {stab['segments']} equal slices; a slice's load correlates with "
        f"the previous one's at {fmt_num(_nanmean(stab['segment_correlation']))} on average, and "
        f"{fmt_pct(_nanmean(stab['top_retained']))} of the first slice's top-{ra.top_k} experts per layer "
        "are still top in the last. A token shares "
        f"{fmt_pct(_nanmean(stab['consecutive_overlap']))} of its experts with the previous token of its "
        f"sequence ({fmt_int(stab['consecutive_pairs'])} pairs) against "
        f"{fmt_pct(_nanmean(stab['independent_overlap']))} for independent tokens.",
    ]
    return Section("routing", "Routing analysis", paragraphs, [table, pairs], figs)


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _inputs_section(inputs: ReportInputs) -> Section:
    meta = inputs.metadata
    trace_rows = [
        ["trace", ", ".join(inputs.trace_paths)],
        ["model", f"{meta.model_id} "
                  f"({meta.model_type}){' rev ' + meta.model_revision if meta.model_revision else ''}"],
        ["source", meta.source],
        ["tokens", fmt_int(inputs.num_tokens)],
        ["MoE layers", f"{meta.num_moe_layers} of {meta.num_hidden_layers} decoder layers"],
        ["experts x top-k", f"{meta.num_experts} x top-{meta.top_k}"
         + (f", {meta.num_shared_experts} shared" if meta.num_shared_experts else "")],
        ["hidden / expert FFN",
         f"{meta.hidden_size} / {meta.expert_intermediate_size} ({meta.expert_activation})"],
        ["router", f"{meta.router_scoring}, norm_topk_prob={meta.norm_topk_prob}"],
        ["model dtype", meta.model_dtype],
        ["created", f"{meta.created_at or 'unknown'} by {meta.tool_version or 'unknown tool version'}"],
    ]
    hw_rows = [
        [g.name, fmt_num(g.bf16_flops / 1e12, 0), fmt_num(g.hbm_bytes / 1e9, 0),
         fmt_num(g.hbm_bandwidth / 1e12, 2), fmt_num(g.scale_up_bandwidth / 1e9, 0),
         fmt_num(g.scale_out_bandwidth / 1e9, 0),
         f"{g.scale_up_latency * 1e6:.1f} / {g.scale_out_latency * 1e6:.1f}",
         cost_model.pricing_for(g, meta).source]
        for g in inputs.hardware
    ]
    nonexpert = cost_model.non_expert_work(meta)
    assumptions = [
        ["matmul efficiency", fmt_pct(cost_model.MATMUL_EFFICIENCY),
         "bf16 matmul measured on H100 (790 of 989 TFLOP/s)"],
        ["HBM efficiency", fmt_pct(cost_model.HBM_EFFICIENCY),
         "device copy measured on H100 (3.0 of 3.35 TB/s)"],
        ["scale-up dispatch / combine", f"{fmt_pct(cost_model.SCALE_UP_DISPATCH_EFFICIENCY)} / "
         f"{fmt_pct(cost_model.SCALE_UP_COMBINE_EFFICIENCY)}", "DeepEP intranode EP8 on H800 NVLink"],
        ["scale-out dispatch / combine", f"{fmt_pct(cost_model.SCALE_OUT_DISPATCH_EFFICIENCY)} / "
         f"{fmt_pct(cost_model.SCALE_OUT_COMBINE_EFFICIENCY)}", "DeepEP internode EP16 over CX7 400 Gb/s"],
        ["weights and activations", f"{cost_model.BF16_BYTES} bytes", "BF16 serving precision"],
        ["expert weights", fmt_bytes(cost_model.expert_weight_bytes(meta)),
         "per routed expert, from the metadata"],
        ["FLOPs per assignment", fmt_int(meta.flops_per_assignment), "2 x matrices x hidden x expert FFN"],
        ["HBM reserve", fmt_pct(inputs.replay.config.get("hbm_reserve", cost_model.DEFAULT_HBM_RESERVE)),
         "kept for KV cache, activations and the runtime"],
        ["non-expert FLOPs / token", fmt_int(nonexpert.flops_per_token), "; ".join(nonexpert.assumptions)],
        ["non-expert weights", fmt_bytes(nonexpert.weight_bytes),
         "attention, dense layers, embeddings, LM head"],
    ]
    if inputs.rebalance:
        advice = inputs.rebalance_advice or advise(inputs.rebalance)
        assumptions += [
            ["rebalance margin", fmt_pct(advice.margin),
             "a refit must shorten the step by this much, moves included"],
            ["rebalance weight moves", "peak scale-up bandwidth",
             "the busiest receiving GPU's bytes (never overstated)"],
        ]
    settings_rows = [[k, _plain(v)] for k, v in sorted(inputs.settings.items())]
    tables = [
        Table(["field", "value"], trace_rows, caption="Trace"),
        Table(["GPU", "dense BF16 TFLOP/s", "HBM GB", "HBM TB/s", "scale-up GB/s", "scale-out GB/s",
               "latency up / out (us)", "expert time priced by"], hw_rows,
              caption="Hardware (per GPU, one direction) and what priced its expert time",
              numeric=[False] + [True] * 6 + [False],
              legend="peak datasheet figures (the cost model applies the efficiencies below); latencies are "
                     "per all-to-all phase, stated assumptions rather than datasheet figures"),
        Table(["assumption", "value", "why"], assumptions,
              caption="Cost model assumptions (docs/cost-model.md)"),
    ]
    if settings_rows:
        tables.append(Table(["option", "value"], settings_rows, caption="Command options"))
    return Section("inputs", "Inputs", [], tables)


def _plain(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return "" if value is None else str(value)


# ------------------------------------------------------------------------------------------------------ build


def trace_title(meta: TraceMetadata) -> str:
    """What the trace is from: the model id, or "synthetic (preset NAME)" for `moe-sim synth` traces, whose
    model id is the preset's hub id though no such model ran."""
    if meta.source != "synthetic":
        return meta.model_id
    names = [name for name, preset in PRESETS.items() if preset.model_id == meta.model_id]
    return f"synthetic (preset {names[0]})" if names else f"synthetic ({meta.model_id} shapes)"


def build_report(inputs: ReportInputs) -> Report:
    """Turn computed results into the report's sections, plots and numbers."""
    sections = [
        _recommendation_section(inputs),
        _layouts_section(inputs),
        traffic_section(inputs.traffic),
        _rebalance_section(inputs),
        _routing_section(inputs),
        _inputs_section(inputs),
    ]
    meta = inputs.metadata
    data = {
        "trace": inputs.trace_paths,
        "num_tokens": inputs.num_tokens,
        "model_id": meta.model_id,
        "plan": inputs.plan.to_dict() if inputs.plan is not None else None,
        "replay": inputs.replay.to_dict(),
        "traffic": [p.to_dict() for p in inputs.traffic.points] if inputs.traffic is not None else None,
        "rebalance": [r.to_dict() for r in inputs.rebalance],
        "rebalance_advice": (inputs.rebalance_advice or advise(inputs.rebalance)).to_dict()
        if inputs.rebalance
        else None,
        "routing": inputs.routing.summary(),
        "settings": inputs.settings,
        "step_basis": inputs.steps().to_dict(),
    }
    subtitle = (f"{trace_title(meta)}: {fmt_int(inputs.num_tokens)} tokens from "
                f"{', '.join(inputs.trace_paths)}"
                + (f"; generated {inputs.created_at}" if inputs.created_at else ""))
    return Report("MoE capacity-planning report", subtitle, sections, data)
