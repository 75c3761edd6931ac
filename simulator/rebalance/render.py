"""`render_rebalance(results, advice) -> str`: the rebalance table with its legend and the advice."""

from __future__ import annotations

from simulator import metrics, tables, units
from simulator.rebalance.result import UNIT_PRICES, RebalanceAdvice, RebalanceResult

LEGEND = ("fixed: fitted once on the first window and never moved; oracle: fitted on each interval's own "
          "steps (hindsight, the best a refit could do); refit: fitted every W steps from the last N steps; "
          f"{metrics.STEP_IMBALANCE}; step p95: of each step's own imbalance; balancedness SGLang / vLLM: "
          f"the refit schedule's, as the engines log it; {metrics.SGLANG_BALANCEDNESS}; "
          f"{metrics.VLLM_BALANCEDNESS}; moved / refit: expert weights sent per refit; time / step: the "
          "refit schedule's predicted expert time per step (roofline: the slowest GPU's max(compute, weight "
          "reads) per layer) plus its moves (the busiest receiver's bytes at the peak scale-up bandwidth) "
          "spread over the scored steps; vs fixed: that time against the fixed placement's")


def balancedness_cell(r: RebalanceResult) -> str:
    """SGLang's / vLLM's balancedness of the refit schedule."""
    name = "rebalanced"
    return f"{units.sig(r.sglang_balancedness(name))} / {units.sig(r.vllm_balancedness(name))}"


def step_time(r: RebalanceResult) -> str:
    """The refit schedule's time per step with moves ("load" units without hardware)."""
    x = r.seconds_with_moves()
    return f"{units.sig(x)} load" if r.prices.hardware == UNIT_PRICES else units.seconds(x)


def render_rebalance(results: list[RebalanceResult], advice: RebalanceAdvice, *, width: int | None = None,
                     color: bool = False) -> str:
    first = results[0]
    s = first.settings
    hw = "" if first.prices.hardware == UNIT_PRICES else f" on {first.prices.hardware}"
    table = tables.table(
        f"Refit from the last {first.window} steps, {s.get('policy')} on {s.get('num_gpus')} GPUs{hw} "
        f"({first.scored_steps} of {first.steps} steps scored)",
        [("refit every\nW steps", "right"), ("refits", "right"), ("step imbalance\nrefit", "right"),
         ("refit\nstep p95", "right"), ("fixed", "right"), ("oracle", "right"),
         ("balancedness\nSGLang / vLLM", "right"), ("moved\n/ refit", "right"),
         ("time / step\nwith moves", "right"), ("vs\nfixed", "right")], LEGEND)
    for r in results:
        table.add_row(
            str(r.every), str(r.rebalances), units.sig(r.step_imbalance("rebalanced")),
            units.sig(r.percentile("rebalanced", 95)), units.sig(r.step_imbalance("fixed")),
            units.sig(r.step_imbalance("oracle")),
            balancedness_cell(r),
            units.nbytes(float(r.moved_bytes.mean())) if r.rebalances else "0 B", step_time(r),
            f"{-r.gain():+.1%}",
        )
    head = "Refit" if advice.every is not None else "Don't refit"
    return tables.to_text(table, f"[bold]{head}[/bold]: {advice.reason}.", width=width, color=color)
