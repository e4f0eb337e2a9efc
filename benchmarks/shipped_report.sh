#!/usr/bin/env bash
# The harness end to end on the shipped model, on the machine at hand: bench (transformers vs moekern, then four
# compressions), eval (the offline tasks: held-out multiple choice and perplexity), and one report.
#   benchmarks/shipped_report.sh [OUT_DIR]        (default: moekern-runs/shipped-report)
# On a GPU: context 2048, batch 1..64, 64 decode tokens (the paper's setting). On the CPU: context 256, batch 1 and 4,
# 16 decode tokens, so that it ends in a few minutes; CPU times say nothing about GPU kernels (the report says so).
set -euo pipefail
OUT=${1:-moekern-runs/shipped-report}
PY=${PYTHON:-python}
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  SPEED=(--context 2048 --batch-sizes 1,2,4,8,16,32,64 --decode-tokens 64)
else
  SPEED=(--context 256 --batch-sizes 1,4 --decode-tokens 16)
fi
RECIPES=(layer-drop=2 block-drop=2 expert-drop=2 rtn4+block-drop=2)
TASKS=moekern_heldout_mc,moekern_heldout_ppl
rm -rf "$OUT"
$PY -m moekern bench shipped "${SPEED[@]}" --out "$OUT/bench"
$PY -m moekern eval shipped --tasks "$TASKS" --out "$OUT/eval"
for recipe in "${RECIPES[@]}"; do
  $PY -m moekern bench shipped --recipe "$recipe" "${SPEED[@]}" --out "$OUT/bench"
  $PY -m moekern eval shipped --recipe "$recipe" --tasks "$TASKS" --out "$OUT/eval"
done
$PY -m moekern report "$OUT/bench" "$OUT/eval" --out "$OUT"
echo "report: $OUT/report.md"
