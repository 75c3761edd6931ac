"""How one GPU's grouped-GEMM time moves with the rows of one expert, and whether measuring order matters
(CUDA). A check on the profile's G(x, W) table, which reads the time at a few rows per octave: this sweeps
every 16 rows, once in ascending order (as calibration's grid queues cells), once shuffled, and once with
every cell queued behind a large GEMM that keeps the GPU at full power (as the skewed vectors and real steps
are timed), and once on a backend that also holds the model's other experts as empty groups.

    python -m bench.bench_gemm_rows --model mixtral-8x7b --experts 1 --out rows.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from simulator.calibrate.expert_work import ExpertShape, assignments_from_counts, make_backend
from simulator.calibrate.timing import GapFreeTimer
from traces.presets import PRESETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--experts", type=int, default=1, help="experts with work (rows split evenly)")
    ap.add_argument("--max-rows", type=int, default=1024)
    ap.add_argument("--step", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    preset = PRESETS[args.model]
    shape = ExpertShape(args.model, preset.hidden_size, preset.expert_intermediate_size, "swiglu")
    dev = torch.device("cuda")
    n_exp = 1 << max(0, (preset.num_experts - 1).bit_length())
    wide_backend = make_backend("torch-grouped-mm", shape, n_exp, dev)
    backend = wide_backend.with_experts(args.experts)
    timer = GapFreeTimer(dev)
    rng = np.random.default_rng(0)
    rows = list(range(args.step, args.max_rows + 1, args.step))
    items = []
    works = []
    with torch.inference_mode():
        for r in rows:
            counts = np.full(args.experts, max(1, r // args.experts), dtype=np.int64)
            w = assignments_from_counts(counts, shape.hidden_size, dev, rng, top_k=preset.top_k)
            works.append(w)
            items.append(backend.gemms_only(w))
        out: dict[str, object] = {"model": args.model, "experts": args.experts, "rows": rows,
                                  "gpu": torch.cuda.get_device_name(dev)}
        out["ascending"] = timer.time(items, repeats=args.repeats).tolist()
        order = rng.permutation(len(items))
        shuffled = timer.time([items[i] for i in order], repeats=args.repeats)
        back = np.empty(len(items))
        back[order] = shuffled
        out["shuffled"] = back.tolist()
        heat_counts = np.full(args.experts, 8192 // args.experts, dtype=np.int64)
        heater = backend.gemms_only(assignments_from_counts(heat_counts, shape.hidden_size, dev, rng))
        paired = timer.time([f for it in items for f in (heater, it)], repeats=args.repeats)
        out["after_heater"] = paired[1::2].tolist()
        if args.experts < n_exp:  # the same cells with the empty groups of a backend holding all experts
            wide = [wide_backend.gemms_only(assignments_from_counts(
                np.pad(np.full(args.experts, max(1, r // args.experts)), (0, n_exp - args.experts)),
                shape.hidden_size, dev, rng, top_k=preset.top_k)) for r in rows]
            out["with_empty_groups"] = timer.time(wide, repeats=args.repeats).tolist()
    text = json.dumps(out)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    for i, r in enumerate(rows):
        print(f"rows {r:5d}: ascending {out['ascending'][i] * 1e6:7.1f} us  shuffled "  # type: ignore[index]
              f"{back[i] * 1e6:7.1f}  after heater {paired[1::2][i] * 1e6:7.1f}")
    wide_s = out.get("with_empty_groups")
    if isinstance(wide_s, list):
        for r, t in zip(rows, wide_s, strict=True):
            print(f"rows {r:5d}: with {n_exp - args.experts} empty groups {t * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
