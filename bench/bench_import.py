"""Import throughput and peak memory: SGLang per_token dumps and generic JSON lines, at two sizes each.

Dumps are written in each tool's layout (tests/import_fixtures.py's builders at scale): SGLang per_token with
OLMoE's shapes (16 layers, 64 experts, top-8 padded to 8 columns, 2 redundant physical experts), passes of
`--pass-tokens` tokens, one rank file; JSONL with one row per (request, layer, token), 512-token requests,
expert lists and gating probabilities. Each import runs in a fresh process; throughput counts import_dump
alone (not the interpreter's start or torch's import), peak memory is that process's maximum RSS.

    # 2M and 4M SGLang tokens, 25k and 50k JSONL tokens:
    python -m bench.bench_import --write-docs
    python -m bench.bench_import --sglang-tokens 1000000,10000000 --jsonl-tokens 100000,10000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import machine, update_section

L, E, K, SLOTS = 16, 64, 8, 8
REPLICAS = np.array([3, 5])


def write_sglang(path: Path, tokens: int, pass_tokens: int, seed: int = 0) -> None:
    import torch

    rng = np.random.default_rng(seed)
    p2l = np.tile(np.concatenate([np.arange(E), REPLICAS]), (L, 1))
    # distinct experts per (layer, token): the first K of one of 4096 random permutations (fast to draw)
    perms = np.argsort(rng.random((4096, E), dtype=np.float32), axis=-1)[:, :K].astype(np.int32)
    records = []
    done = 0
    step = 0
    while done < tokens:
        n = min(pass_tokens, tokens - done)
        topk = np.full((L, n, SLOTS), -1, dtype=np.int32)
        topk[:, :, :K] = perms[rng.integers(0, perms.shape[0], (L, n))]
        seqs = max(1, n // 512)
        lens = [n // seqs] * seqs
        lens[-1] += n - sum(lens)
        positions = np.concatenate([np.arange(m) for m in lens]).tolist()
        records.append(dict(forward_pass_id=step, rank=0, gatherer_key="primary", input_ids=list(range(n)),
                            positions=positions, extend_seq_lens=lens, forward_mode=1,
                            topk_ids_of_layer=torch.from_numpy(topk), misc_objects=[],
                            global_physical_count=torch.zeros((L, E + 2), dtype=torch.int32)))
        done += n
        step += 1
    torch.save(dict(records=records, last_physical_to_logical_map=torch.from_numpy(p2l)), path)


def write_jsonl(path: Path, tokens: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for start in range(0, tokens, 512):
            n = min(512, tokens - start)
            ids = np.argsort(rng.random((n, L, E), dtype=np.float32), axis=-1)[..., :K]
            w = np.round(rng.random((n, L, K)), 4)
            for layer in range(L):
                for t in range(n):
                    fh.write(json.dumps({"request_id": start // 512, "layer": layer, "token_idx": t,
                                         "topk_ids": ids[t, layer].tolist(),
                                         "topk_weights": w[t, layer].tolist()})
                             + "\n")


RUNNER = """
import json, sys, time
import torch  # imported before the clock starts: its import is the interpreter's cost, not the import's
from traces.importers import ImportOptions, import_dump
from traces.importers.tabular import Columns
src, out, fmt = sys.argv[1:4]
opts = ImportOptions(columns=Columns(weights="topk_weights")) if fmt == "tabular" else ImportOptions()
t0 = time.perf_counter()
r = import_dump([src], out, fmt, model="olmoe-1b-7b", options=opts, force=True)
dt = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve from the parent that built the dump
hwm = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")][0]
print(json.dumps({"tokens": r.num_tokens, "seconds": dt, "peak_rss": hwm * 1024}))
"""


def run_import(src: Path, out: Path, fmt: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", RUNNER, str(src), str(out), fmt], capture_output=True,
                            text=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _verdict(rows: list[tuple[str, int, int, dict]], load: str) -> str:
    """Targets against the figures measured (for the largest SGLang dump and the memory trend)."""
    sg = [(tokens, res) for fmt, tokens, _, res in rows if fmt == "sglang-per-token"]
    text = "Targets: 1 M tokens/s or more for the binary formats, memory flat as the input grows."
    if sg:
        (small, first), (big, last) = sg[0], sg[-1]
        rate = last["tokens"] / last["seconds"]
        mib = (first["peak_rss"] / 2**20, last["peak_rss"] / 2**20)
        text += (f" SGLang per_token at {big:,} tokens: {rate / 1e6:.2f} M tokens/s "
                 f"({'meets' if rate >= 1e6 else 'short of'} the target); peak RSS {mib[0]:,.0f} MiB at "
                 f"{small:,} tokens, {mib[1]:,.0f} MiB at {big:,}. The dump is read twice, streamed "
                 "(docs/import.md, SGLang per_token): token lists decode straight into arrays and a record's "
                 "tensors are read when it is imported, so memory holds one record; the time goes to the id "
                 "kernels, the HDF5 writer's compression and checksums, and Numba's start in a fresh process "
                 "(about a second, paid once).")
    text += (" JSONL streams line by line and holds one request: its memory stays flat; its rate is Python's "
             f"json parsing of 16 rows per token. Load average {load}.")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sglang-tokens", default="2000000,4000000")
    parser.add_argument("--jsonl-tokens", default="25000,50000")
    parser.add_argument("--pass-tokens", type=int, default=8192, help="Tokens per SGLang forward pass.")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    import os

    rows = []
    start_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for fmt, sizes in (("sglang-per-token", args.sglang_tokens), ("tabular", args.jsonl_tokens)):
            for tokens in (int(x) for x in sizes.split(",")):
                src = folder / ("dump.pt" if fmt != "tabular" else "dump.jsonl")
                (write_sglang(src, tokens, args.pass_tokens) if fmt != "tabular"
                 else write_jsonl(src, tokens))
                os.sync()  # the dump's write-back is not the import's to pay
                res = run_import(src, folder / "out.h5", fmt)
                rows.append((fmt, tokens, src.stat().st_size, res))
                print(fmt, tokens, f"{res['tokens'] / res['seconds']:,.0f} tokens/s",
                      f"peak {res['peak_rss'] / 2**20:.0f} MiB", flush=True)
                src.unlink()
    load = (f"{start_load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (cores shared with other "
            "jobs)")
    table = ["| source | tokens | dump size | import tokens/s | peak RSS |", "|---|---:|---:|---:|---:|"]
    for fmt, tokens, size, res in rows:
        table.append(f"| {fmt} | {tokens:,} | {size / 2**20:,.0f} MiB | "
                     f"{res['tokens'] / res['seconds']:,.0f} | {res['peak_rss'] / 2**20:,.0f} MiB |")
    text = "\n".join([
        "## Import (`python -m bench.bench_import`)", "",
        f"Machine: {machine()}. OLMoE shapes (16 layers x 64 experts, top-8). SGLang per_token: one rank "
        f"file, passes of {args.pass_tokens} tokens, ids mapped physical -> logical, token ids kept. JSONL: "
        "one row per (request, layer, token) with expert list and gating probabilities (--from tabular). "
        "Fresh process per import; throughput is import_dump's own time to a finished HDF5 trace; peak RSS "
        "of that process.",
        "", *table, "",
        _verdict(rows, load),
    ])
    if args.write_docs:
        update_section("import", text)
    print(text)


if __name__ == "__main__":
    main()
