#!/usr/bin/env bash
# Held-out quality of `mpq solve --solver sac` plans next to the ILP's on the main job's table
# (experiments/configs/smollm2.toml: SmolLM2's recipe, mpq.recipes, so `mpq solve` takes the
# same palette, anchor-measured table, importance data and calibration windows). Stage 1 writes
# the plans (no guard: the plans as the solvers make them); stage 2 evaluates the plans that
# differ from the ILP's on wiki and bbc held-out (16 x 512 tokens). Run each stage under the
# shared lock: flock /work/wt/heavy.lock nice -n 5 bash experiments/bench/sac_heldout.sh plans
set -euo pipefail
OUT=${OUT:-experiments/results/sac-heldout}
PY=${PY:-python}
BUDGETS=${BUDGETS:-"3.5 4.0 4.45"}
mkdir -p "$OUT"
case "${1:-plans}" in
plans)
  for b in $BUDGETS; do
    for s in ilp sac; do
      $PY -m mpq.cli solve --model smollm2-135m --solver "$s" --budget "bits=$b" --no-guard \
        --out "$OUT/${s}_$b.json" | tee "$OUT/${s}_$b.log"
    done
  done ;;
eval)  # eval PLAN...: each plan (or 'fp') on wiki and bbc held-out
  shift
  for plan in "$@"; do
    name=$(basename "$plan" .json)
    for data in wiki bbc; do
      $PY -m mpq.cli eval --model smollm2-135m --plan "$plan" --data "$data" --split heldout \
        --n 16 --seq-len 512 > "$OUT/eval_${name}_$data.json"
      cat "$OUT/eval_${name}_$data.json"
    done
  done ;;
esac
