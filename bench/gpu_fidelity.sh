#!/usr/bin/env bash
# Re-measure the shipped H200 profiles and re-run the fidelity benchmarks on a CUDA machine:
#   bench/gpu_fidelity.sh [calibrate] [model] [steps]     (default: all three, in this order)
# calibrate: torch grouped GEMM (the three shapes) and transformers experts (OLMoE-1B-7B) into data/profiles/;
# model: whole-model fidelity; steps: per-step fidelity (STEPS steps per cell, default 4); figures go to
# docs/benchmarks.md. Copies both to $OUT when set (a lent machine hands back only what is under $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${STEPS:-4}
parts=${*:-calibrate model steps}
sim() { "$PY" -c 'import cli; cli.moe_sim()' "$@"; }
save() { [ -z "${OUT:-}" ] || { mkdir -p "$OUT/data/profiles" "$OUT/docs"; cp data/profiles/*.yaml "$OUT/data/profiles/";
                               cp docs/benchmarks.md "$OUT/docs/"; }; }
start=$SECONDS
for part in $parts; do
  t=$SECONDS
  case $part in
    calibrate)
      sim calibrate --quiet --force -o data/profiles/h200-torch-grouped-mm.yaml
      echo "calibrate torch-grouped-mm: $((SECONDS - t)) s"
      t=$SECONDS
      sim calibrate --quiet --force --backend transformers --model olmoe-1b-7b -o data/profiles/h200-transformers.yaml
      echo "calibrate transformers: $((SECONDS - t)) s";;
    model) "$PY" -m bench.bench_fidelity_model --write-docs;;
    steps) "$PY" -m bench.bench_fidelity --steps "$STEPS" --write-docs | tee "${OUT:-/tmp}/fidelity.log";;
    *) echo "unknown part $part (calibrate, model, steps)" >&2; exit 2;;
  esac
  echo "$part: $((SECONDS - t)) s"
  save
done
echo "total: $((SECONDS - start)) s"
