"""`render_replay(result) -> str`: the replay's step-size line, tables with their legends, and the fastest
placement."""

from __future__ import annotations

from rich.table import Table

from simulator import metrics, tables, units
from simulator.replay.results import ReplayResult


def render_replay(result: ReplayResult, *, per_layer: bool = False, width: int | None = None,
                  color: bool = False) -> str:
    """Everything `moe-sim replay` prints, as text (rich markup as colour only with `color`)."""
    best = min(result.placements, key=lambda s: s.timings[0].step_time["mean"])
    items: list[str | Table] = [*step_size_lines(result), replay_table(result), breakdown_table(result),
                                balancedness_table(result)]
    if per_layer:
        items.append(per_layer_table(result))
    items += [f"Skipped {policy}: {reason}." for policy, reason in result.skipped]
    items.append(f"Fastest: [bold]{best.label}[/bold] at {units.seconds(best.timings[0].step_time['mean'])} "
                 f"MoE time per step, step imbalance {units.sig(best.step_imbalance)}.")
    return tables.to_text(*items, width=width, color=color)


def _dropped(count: int, fraction: float) -> str:
    return "0" if count == 0 else f"{units.si(count)} ({units.share(fraction)})"


def is_tiny_builtin(model_id: str) -> bool:
    """A built-in random model made for trying the tools (recorder/builtin_models.py names them
    "<family>-tiny")."""
    return model_id.endswith("-tiny")


def step_size_lines(result: ReplayResult) -> list[str]:
    """What a scored step holds, a warning when --tokens-per-step is more than the scored part can fill, and a
    note on a built-in tiny model."""
    s = result.placements[0]
    size = s.step_tokens
    regrouped = s.tokens_per_step > 0
    what = (f"{s.tokens_per_step:,} tokens of one phase (--tokens-per-step)" if regrouped
            else "the recorded forward passes")
    lines = [f"Steps: {what}; {s.steps:,} scored steps of {size['mean']:,.1f} tokens on average "
             f"(min {size['min']:,.0f}, max {size['max']:,.0f})."]
    if regrouped and size["max"] < s.tokens_per_step:
        lines.append(f"[yellow]warning:[/yellow] --tokens-per-step {s.tokens_per_step:,} is more than the "
                     f"{s.tokens:,} scored tokens: every step is partial (smaller than asked for).")
    model = result.metadata.get("model_id", "")
    if is_tiny_builtin(model):
        lines.append(f"note: {model} is a built-in tiny model with random weights (hidden size "
                     f"{result.metadata.get('hidden_size')}): its steps and times show how the tools work, "
                     "not how a real model serves.")
    return lines


def replay_table(result: ReplayResult) -> Table:
    """Headline comparison, one row per placement (fits 120 columns); time split in `breakdown_table`."""
    cfg = result.config
    hw = cfg["hardware"]["name"]
    title = (f"{cfg['num_gpus']} x {hw} ({cfg['gpus_per_node']} per node), phase {cfg['phase']}, "
             f"dispatch {cfg['dispatch']}, fitted on {result.fit_tokens:,} tokens, scored on "
             f"{result.placements[0].tokens:,}")
    priced = result.placements[0].timings[0].priced_by
    caption = (f"{metrics.STEP_IMBALANCE}; {metrics.STEP_PERCENTILE}; dispatch: how each step's tokens of an "
               "expert split over its replicas (--dispatch); leave: share of assignments sent off "
               "the token's GPU / node; MoE time: mean predicted time per step of the MoE layers; memory: "
               "expert weights per GPU (share of HBM), 'over' past HBM x (1 - reserve)\n"
               f"expert time priced by: {priced.get('expert_time', '-')}; all-to-all: "
               f"{priced.get('all_to_all', '-')}")
    table = tables.table(title, [("placement", "left"), ("step\nimbalance", "right"), ("step\np95", "right"),
                           ("leave\nGPU", "right"), ("leave\nnode", "right"), ("all-to-all\n/step", "right"),
                           ("MoE time\n/step", "right"), ("tokens/s\n/GPU", "right"),
                           ("memory/GPU\n(of HBM)", "right"), ("dropped", "right")], caption)
    for s in result.placements:
        t = s.timings[0]
        table.add_row(
            s.label, units.sig(s.step_imbalance), units.sig(s.step_imbalance_percentiles["p95"]),
            units.share(s.leave_gpu_share), units.share(s.leave_node_share),
            units.nbytes(s.all_to_all_bytes_per_step), units.seconds(t.step_time["mean"]),
            units.si(t.tokens_per_s_per_gpu),
            f"{units.nbytes(t.expert_memory_bytes)} ({units.share(t.expert_memory_share)})"
            + ("" if t.expert_memory_fits else " [red]over[/red]"),
            _dropped(s.dropped_assignments, s.dropped_share),
        )
    return table


def breakdown_table(result: ReplayResult) -> Table:
    """Mean MoE time per step split into its parts, the step-time percentiles and per-step imbalance
    spread."""
    hw = result.config["hardware"]["name"]
    table = tables.table(f"MoE time per step on {hw}: mean split, then percentiles",
                   [("placement", "left"), ("compute", "right"), ("weights", "right"), ("dispatch", "right"),
                    ("combine", "right"), ("p50", "right"), ("p95", "right"), ("p99", "right"),
                    ("step imbalance\np50/p99", "right"), ("aggregate\nimbalance", "right")],
                   "compute / weights: expert time booked by its larger roofline term; p50-p99: of the "
                   "predicted step time; step imbalance p50/p99: of each step's own imbalance; "
                   f"{metrics.AGGREGATE_IMBALANCE}")
    for s in result.placements:
        t = s.timings[0]
        b, q = t.breakdown, t.step_time
        table.add_row(s.label, *(units.seconds(b[k]) for k in ("compute", "weights", "dispatch", "combine")),
                      *(units.seconds(q[k]) for k in ("p50", "p95", "p99")),
                      f"{units.sig(s.step_imbalance_percentiles['p50'])}/"
                      f"{units.sig(s.step_imbalance_percentiles['p99'])}", units.sig(s.aggregate_imbalance))
    return table


def balancedness_table(result: ReplayResult) -> Table:
    """The serving engines' own balance figures beside moe-trace's, over the same scored steps."""
    columns = [("placement", "left"), ("step\nimbalance", "right"), ("aggregate\nimbalance", "right"),
               ("SGLang\nbalancedness", "right"), ("vLLM\nbalancedness", "right")]
    table = tables.table("Balance as the engines log it, beside moe-trace's imbalance", columns,
                         f"{metrics.SGLANG_BALANCEDNESS}; {metrics.VLLM_BALANCEDNESS}; both weight every "
                         "step alike, the step imbalance weights a step by its load")
    for s in result.placements:
        table.add_row(s.label, units.sig(s.step_imbalance), units.sig(s.aggregate_imbalance),
                      units.sig(s.sglang_balancedness), units.sig(s.vllm_balancedness))
    return table


def per_layer_table(result: ReplayResult) -> Table:
    table = tables.table("Per layer: step imbalance | leave-node share | MoE time per step",
                   [("layer", "right"), *((s.label, "right") for s in result.placements)],
                   "each cell: the layer's step imbalance (its busiest GPU per step over its mean GPU), the "
                   "share of its assignments served on another node, and its mean predicted MoE time per "
                   "step")
    layers = len(result.placements[0].per_layer)
    for layer in range(layers):
        cells = []
        for s in result.placements:
            row = s.per_layer[layer]
            time = sum(s.timings[0].per_layer[layer].values())
            cells.append(f"{units.sig(row['step_imbalance'])} | {units.share(row['leave_node_share'])} | "
                         f"{units.seconds(time)}")
        table.add_row(str(layer), *cells)
    return table


