#!/usr/bin/env bash
# Re-measure the shipped H200 profiles and re-run the fidelity benchmarks on a CUDA machine, in this order:
# calibrate (torch grouped GEMM: the three shapes; transformers experts: OLMoE-1B-7B), whole-model fidelity,
# per-step fidelity. Profiles go to data/profiles/, figures to docs/benchmarks.md. Copies both to $OUT when set
# (a lent machine hands back only what is under $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${STEPS:-4}
sim() { "$PY" -c 'import cli; cli.moe_sim()' "$@"; }
save() { [ -z "${OUT:-}" ] || { mkdir -p "$OUT/data/profiles" "$OUT/docs"; cp data/profiles/*.yaml "$OUT/data/profiles/";
                               cp docs/benchmarks.md "$OUT/docs/"; }; }
start=$SECONDS
sim calibrate --quiet --force -o data/profiles/h200-torch-grouped-mm.yaml
echo "calibrate torch-grouped-mm: $((SECONDS - start)) s"
t=$SECONDS
sim calibrate --quiet --force --backend transformers --model olmoe-1b-7b -o data/profiles/h200-transformers.yaml
echo "calibrate transformers: $((SECONDS - t)) s"
save
"$PY" -m bench.bench_fidelity_model --write-docs
save
"$PY" -m bench.bench_fidelity --steps "$STEPS" --write-docs
save
echo "total: $((SECONDS - start)) s"
