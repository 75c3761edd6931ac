"""The report: every section and plot present, numbers that match the results it was built from, renderers,
the atomic write with its --force rules, and the commands through a subprocess."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from report_fixtures import small_report_inputs

from simulator.rebalance import count_steps
from simulator.report import build_report, render_html, render_markdown, write_report
from simulator.report.build import SECTION_KEYS
from simulator.report.format import fmt_int, fmt_num, fmt_pct
from traces import InputError, open_trace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURE_KEYS = {
    "layouts": ["imbalance-over-time", "gpu-load", "node-traffic", "time-breakdown"],
    "traffic": ["traffic-tradeoff"],
    "rebalance": ["rebalance"],
    "routing": ["load-heatmap", "entropy-gini", "coselection", "phases", "stability"],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    trace, inputs = small_report_inputs(tmp_path_factory.mktemp("report"))
    return trace, inputs, build_report(inputs)


def test_every_section_and_plot_present(built):
    _, _, report = built
    assert [s.key for s in report.sections] == list(SECTION_KEYS)
    for key, figs in FIGURE_KEYS.items():
        assert [f.key for f in report.section(key).figures] == figs
    for fig in report.figures:
        assert fig.png.startswith(PNG_SIGNATURE) and len(fig.png) > 5000, fig.key
        assert fig.width >= 400 and fig.height >= 200, fig.key
        assert fig.title and fig.caption


def test_report_options_share_the_scoring_checks():
    from simulator.hardware import GpuSpec
    from simulator.report.collect import ReportOptions
    from traces.errors import InputError

    h100 = [GpuSpec.from_name("h100")]
    with pytest.raises(InputError, match="not divisible into nodes"):
        ReportOptions(hardware=h100, gpus=[8, 12])
    with pytest.raises(InputError, match="--fit-fraction must be in"):
        ReportOptions(hardware=h100, gpus=[8], fit_fraction=1.5)
    with pytest.raises(InputError, match="--phase must be one of"):
        ReportOptions(hardware=h100, gpus=[8], phase="both")


def test_every_results_table_has_a_legend(built):
    _, _, report = built
    for key in ("recommendation", "layouts", "rebalance", "routing"):
        section = report.section(key)
        for table in section.lead + section.tables:
            assert len(table.legend) > 40, (key, table.caption)
    assert "fixed: fitted once on the first window" in report.section("rebalance").tables[0].legend
    assert "meets target: fits in memory" in report.section("recommendation").lead[0].legend


def test_recommendation_matches_plan(built):
    _, inputs, report = built
    plan = inputs.plan
    section = report.section("recommendation")
    assert plan is not None and plan.recommendation is not None  # a 1000 tokens/s target is met by something
    assert plan.recommendation.describe() in section.paragraphs[0]
    assert section.bullets == plan.reasons  # the skipped points are folded, not bullets
    (frontier,) = section.lead  # the frontier comes right after the recommendation, before the reasons
    (per_layout,) = section.tables
    if plan.skipped:
        (folded,) = section.details
        assert (folded.summary.startswith(f"Skipped {len(plan.skipped)} grid point")
                and folded.items == plan.skipped)
    else:
        assert not section.details
    assert len(frontier.rows) == len(plan.frontier)
    assert [r[0] for r in frontier.rows].count("yes") == (plan.recommendation in plan.frontier)
    for row, cand in zip(frontier.rows, plan.frontier, strict=True):
        assert row[1:4] == [cand.hardware, str(cand.num_gpus), cand.placement]
        assert row[7] == fmt_int(cand.tokens_per_s)
    # one row per (hardware, GPU count): 2 x 2
    assert sorted((r[1], r[2]) for r in per_layout.rows) == [("h100", "16"), ("h100", "8"), ("h200", "16"),
                                                            ("h200", "8")]
    assert report.data["plan"]["recommendation"]["placement"] == plan.recommendation.placement


def test_recommendation_leads_and_skipped_points_fold(built):
    from simulator.report.model import Details, Section
    from simulator.report.render import render_html, render_markdown

    _, _, report = built
    page = render_html(report)
    rec = page[page.index('<section id="recommendation">'):page.index('<section id="layouts">')]
    assert (rec.index("<caption>Frontier") < rec.index('<ul class="bullets">')
            < rec.index("<caption>Best placement"))
    # a folded list renders as one summary line with its items under it
    section = Section("x", "X", ["p"], details=[Details("Skipped 2 grid points", ["a: why", "b: why"])])
    one = dataclasses.replace(report, sections=[section])
    assert ("<details><summary>Skipped 2 grid points</summary><ul><li>a: why</li><li>b: why</li></ul>"
            "</details>" in render_html(one))
    md = render_markdown(one)
    assert "<details><summary>Skipped 2 grid points</summary>\n\n- a: why\n- b: why\n\n</details>" in md


def test_layouts_match_replay(built):
    _, inputs, report = built
    replay = inputs.replay
    rec = inputs.plan.recommendation
    # the replayed layout is the recommended one
    assert (replay.config["num_gpus"], replay.config["hardware"]["name"]) == (rec.num_gpus, rec.hardware)
    (table,) = report.section("layouts").tables
    assert [r[0] for r in table.rows] == [p.label for p in replay.placements]
    for row, p in zip(table.rows, replay.placements, strict=True):
        assert row[1] == fmt_num(p.step_imbalance) and row[2] == fmt_num(p.aggregate_imbalance)
        assert row[5:7] == [fmt_num(p.sglang_balancedness), fmt_num(p.vllm_balancedness)]
        assert row[10] == f"{p.timings[0].step_time['mean'] * 1e3:.3f}"
    assert report.data["replay"]["placements"][0]["label"] == replay.placements[0].label


def test_replay_and_rebalance_step_at_recommended_batch(built):
    trace, inputs, report = built
    rec = inputs.plan.recommendation
    # the fixture plans a 16-token per-GPU batch: a step is 16 x the recommended GPU count, not a recorded
    # pass
    assert rec.tokens_per_gpu == 16 and rec.tokens_per_step == 16 * rec.num_gpus
    basis = inputs.step_basis
    assert (basis.source, basis.tokens_per_step, basis.tokens_per_gpu, basis.num_gpus) == (
        "recommendation", rec.tokens_per_step, 16, rec.num_gpus)
    # used: the replay and the rebalance replay were run at that step size
    assert inputs.replay.config["tokens_per_step"] == rec.tokens_per_step
    for p in inputs.replay.placements:
        assert p.tokens_per_step == rec.tokens_per_step
        # phases are regrouped apart: at most one short step per phase, so the mean step is nearly full
        assert rec.tokens_per_step * (p.steps - 2) <= p.tokens <= rec.tokens_per_step * p.steps
    for r in inputs.rebalance:
        assert r.settings["tokens_per_step"] == rec.tokens_per_step
    with open_trace(trace) as tr:
        assert inputs.rebalance[0].steps == count_steps(tr, tokens_per_step=rec.tokens_per_step)
        assert inputs.rebalance[0].steps != count_steps(tr)  # the recorded passes would give another count
    # stated: both sections name the step size in their text and captions
    size = f"{fmt_int(rec.tokens_per_step)} tokens per step (16 per GPU x {rec.num_gpus} GPUs)"
    for key in ("layouts", "rebalance"):
        section = report.section(key)
        assert any(f"Steps are the recommended layout's batch, {size}" in t for t in section.paragraphs), key
        assert section.tables[0].caption.endswith(f"steps: {size}"), key
    assert report.data["step_basis"]["tokens_per_step"] == rec.tokens_per_step


def test_unmet_target_replays_best_frontier_point(built):
    import dataclasses

    from simulator.report.build import StepBasis
    from simulator.report.collect import replayed_point

    plan = built[1].plan
    unmet = dataclasses.replace(plan, recommendation=None)
    point, source = replayed_point(unmet)
    assert source == "frontier" and point is max(plan.frontier, key=lambda c: c.tokens_per_s)
    text = StepBasis(source, point.tokens_per_step, point.tokens_per_gpu, point.num_gpus,
                     point.describe()).sentence()
    assert text.startswith("No layout meets the goal") and point.describe() in text
    assert f"{fmt_int(point.tokens_per_step)} tokens per step" in text
    assert replayed_point(dataclasses.replace(unmet, frontier=[])) == (None, "fallback")
    assert replayed_point(None) == (None, "")


def test_rebalance_and_routing_match_results(built):
    trace, inputs, report = built
    (table,) = report.section("rebalance").tables
    assert [r[0] for r in table.rows] == ["5", "20"]
    for row, r in zip(table.rows, inputs.rebalance, strict=True):
        assert row[2] == fmt_num(r.step_imbalance("rebalanced"))
        assert row[4] == fmt_num(r.step_imbalance("fixed")) and row[5] == fmt_num(r.step_imbalance("oracle"))
        assert row[6:8] == [fmt_num(r.sglang_balancedness("rebalanced")),
                            fmt_num(r.vllm_balancedness("rebalanced"))]
        assert row[10] == f"{-r.gain():+.1%}"
        assert r.window == 10 and r.scored_steps == r.steps - 10
    routing = report.section("routing")
    stats, pairs = routing.tables
    ra = inputs.routing
    assert len(stats.rows) == ra.num_layers == 16
    assert [row[3] for row in stats.rows] == [fmt_num(g) for g in ra.gini()]
    assert pairs.rows, "co-selected pairs listed"
    data = report.data["routing"]
    assert data["num_tokens"] == inputs.num_tokens == 6000
    assert data["gini"] == pytest.approx(ra.gini().tolist())
    inputs_section = report.section("inputs")
    cells = [c for t in inputs_section.tables for row in t.rows for c in row]
    assert "6,000" in cells and str(trace) in cells and "h200" in cells
    assert any("DeepEP" in c for c in cells)  # cost model assumptions with their sources


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.ids: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if "id" in a:
            self.ids.append(a["id"] or "")
        for name in ("src", "href"):
            if a.get(name):
                self.urls.append(a[name] or "")


def test_html_is_self_contained(built):
    _, _, report = built
    page = render_html(report)
    parser = _Collect()
    parser.feed(page)
    assert len(parser.imgs) == len(report.figures) == 11
    for img, fig in zip(parser.imgs, report.figures, strict=True):
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == fig.png
    assert set(SECTION_KEYS) <= set(parser.ids)
    # nothing to fetch: every URL is a data URI or an in-page anchor
    assert all(u.startswith(("data:", "#")) for u in parser.urls), [u[:40] for u in parser.urls]
    assert "<script" not in page
    assert not re.search(r"url\(\s*['\"]?https?:", page)


def test_markdown_links_images_beside_it(built, tmp_path):
    _, _, report = built
    text = render_markdown(report, image_dir="r_files")
    assert text.count("](r_files/") == 11
    assert all(f"## {s.title}" in text for s in report.sections)
    assert "data:image/png;base64," in render_markdown(report)  # embedded form
    written = write_report(report, tmp_path / "r.md")
    assert written[0] == tmp_path / "r.md"
    files = sorted(p.name for p in (tmp_path / "r_files").iterdir())
    assert files == sorted(f"{f.key}.png" for f in report.figures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md", "r_files"]  # no temporary files left


def test_write_rules(built, tmp_path):
    _, _, report = built
    out = tmp_path / "r.html"
    write_report(report, out)
    before = out.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        write_report(report, out)
    write_report(report, out, force=True)
    assert out.read_bytes().startswith(b"<!DOCTYPE html>") and len(before) > 100_000
    with pytest.raises(InputError, match="unsupported report extension"):
        write_report(report, tmp_path / "r.pdf")
    write_report(report, tmp_path / "new" / "r.html")  # a missing output directory is created
    assert (tmp_path / "new" / "r.html").exists()
    (tmp_path / "m_files").mkdir()
    with pytest.raises(InputError, match="m_files: already exists"):
        write_report(report, tmp_path / "m.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_files", "new", "r.html"]


def _moe_sim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)


def test_cli_report_and_rebalance(built, tmp_path):
    trace, _, _ = built
    out = tmp_path / "cli.html"
    args = ["report", str(trace), "-o", str(out), "--gpus", "8", "--quiet", "--window", "10",
            "--rebalance-every", "10", "--rebalance-placement", "balanced"]
    done = _moe_sim(*args)
    assert done.returncode == 0, done.stderr
    assert "Report written" in done.stderr and out.stat().st_size > 100_000
    again = _moe_sim(*args)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    reb = _moe_sim("rebalance", str(trace), "--window", "10", "--rebalance-every", "5,50", "--gpus", "8",
                   "--json", "--quiet")
    assert reb.returncode == 0, reb.stderr
    results = json.loads(reb.stdout)["results"]
    assert [r["every"] for r in results] == [5, 50]
    assert {"fixed", "rebalanced", "oracle", "moved_bytes_per_rebalance"} <= results[0].keys()
    advice = json.loads(reb.stdout)["advice"]
    assert advice["margin"] == 0.02 and advice["reason"].startswith(("refit every",
                                                                     "keep the fixed placement"))
    assert advice["every"] in (None, 5, 50)
    assert {"step_imbalance", "aggregate_imbalance", "seconds_per_step"} <= results[0]["fixed"].keys()
    table = _moe_sim("rebalance", str(trace), "--window", "10", "--quiet")
    assert table.returncode == 0 and "refit every" in table.stdout
    assert "fixed: fitted once on the first window" in table.stdout  # the legend under the table
    assert ("Don't refit: keep the fixed placement" in table.stdout) == (advice["every"] is None)
    bad = _moe_sim("rebalance", str(trace), "--window", "100000")
    assert bad.returncode == 2 and "--window 100000" in bad.stderr


def test_without_target_replays_first_layout_and_lists_unbuildable(built):
    from simulator.hardware import GpuSpec
    from simulator.report.collect import ReportOptions, collect_inputs
    from traces import open_trace

    trace, _, _ = built
    options = ReportOptions(hardware=[GpuSpec.from_name("a100")], gpus=[6], redundant_experts=[0, 8],
                            placements=("contiguous", "balanced", "replicated"), window=10,
                            rebalance_every=(50,))
    with open_trace(trace) as tr:
        inputs = collect_inputs(tr, options)
    # 64 experts do not divide over 6 GPUs: contiguous and balanced lay them out unevenly (11 and 10 per GPU),
    # and replicated fits with the 8 redundant slots that make 72
    assert inputs.plan is None
    assert [p.label for p in inputs.replay.placements] == ["contiguous", "balanced", "replicated+8"]
    assert inputs.replay.config["num_gpus"] == 6 and inputs.replay.config["hardware"]["name"] == "a100"
    assert "placements not buildable on this layout" not in inputs.settings
    # a policy that cannot apply is listed with its reason, the others are kept: 8 replicas on one GPU
    from simulator.report.collect import _buildable

    ok, skipped = _buildable(("contiguous", "replicated"), 64, 1, 8, 8)
    assert ok == ("contiguous",) and len(skipped) == 1
    assert skipped[0].startswith("replicated: ") and "8 redundant slots" in skipped[0]
    assert inputs.rebalance[0].settings["policy"] == "replicated"
    report = build_report(inputs)
    assert "No throughput target was given" in report.section("recommendation").paragraphs[0]
    fastest = min(inputs.replay.placements, key=lambda p: p.timings[0].step_time["mean"]).label
    assert f"the {fastest} placement has the" in report.section("recommendation").paragraphs[0]
    # no plan: the recorded forward passes are the steps, and both sections say so
    assert inputs.step_basis is not None
    assert inputs.step_basis.source == "recorded" and inputs.replay.config["tokens_per_step"] == 0
    for key in ("layouts", "rebalance"):
        assert any("Steps are the trace's recorded forward passes: no throughput target was given" in t
                   for t in report.section(key).paragraphs), key


def test_plan_and_report_recommend_the_same_layout_by_default(built, tmp_path):
    trace, _, _ = built
    # batches the small trace fills
    target = ["--target-tokens-per-s", "2000", "--tokens-per-gpu", "16", "--quiet"]
    planned = _moe_sim("plan", str(trace), *target, "--json")
    assert planned.returncode == 0, planned.stderr
    reported = _moe_sim("report", str(trace), "-o", str(tmp_path / "same.html"), *target, "--json")
    assert reported.returncode == 0, reported.stderr
    rec = json.loads(planned.stdout)["recommendation"]
    assert rec is not None
    report_plan = json.loads(reported.stdout)["plan"]
    assert report_plan["recommendation"] == rec  # the same grid, defaults and pricing: the same pick
    assert report_plan["config"]["hardware"] == json.loads(planned.stdout)["config"]["hardware"]


def test_report_marks_the_recommendation_titles_synthetic_traces_and_zooms_stability(built):
    from simulator.report.build import trace_title
    from simulator.report.figures import zoom_limits

    _, inputs, report = built
    (fig,) = [f for f in report.figures if f.key == "time-breakdown"]
    assert "The recommended layout is outlined." in fig.caption
    meta = inputs.metadata
    assert trace_title(dataclasses.replace(meta, source="recorded")) == meta.model_id
    synthetic = dataclasses.replace(meta, source="synthetic", model_id="allenai/OLMoE-1B-7B-0924")
    assert trace_title(synthetic) == "synthetic (preset olmoe-1b-7b)"
    assert report.subtitle.startswith(f"{trace_title(meta)}: ")
    # correlations just under 1 get a window around their spread, not [0.9, 1] with the line on the edge
    low, high = zoom_limits(np.array([[0.9951, 0.999], [0.997, np.nan]]))
    assert 0.99 < low < 0.9951 and 0.999 < high < 1.0
    flat_low, flat_high = zoom_limits(np.ones(5))
    assert flat_low < 1.0 < flat_high and flat_high - flat_low == pytest.approx(1e-3)


def test_traffic_section_shows_the_tradeoff(built):
    _, inputs, report = built
    section = report.section("traffic")
    (table,) = section.tables
    curve = inputs.traffic
    assert curve is not None and len(table.rows) == len(curve.points)
    assert {row[1] for row in table.rows} == {"home", "stay"}
    balanced = next(row for row in table.rows if row[0] == "balanced" and row[1] == "home")
    assert balanced[3] == balanced[5] == fmt_pct(0.0)
    assert any("budget" in row[0] for row in table.rows)
    assert "step imbalance" in section.paragraphs[1]
    assert report.data["traffic"][0]["dispatch_model"] == "home"
