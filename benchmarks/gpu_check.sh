#!/usr/bin/env bash
# The GPU checks of the project in one script, about 10 minutes on an H100 or H200; everything lands in OUT_DIR:
#   0. the device's own ceilings first: device-to-device copy bandwidth and bf16 matmul rate (peaks.json); every
#      later stage reads them instead of datasheet figures;
#   1. the kernel tests with the interpreter off (MOEKERN_TEST_GPU=1): the compiled kernels against the reference,
#      among them the 4-bit tensor-core path with its inline-PTX decoder (bf16 and fp16), gate_up split-K, and whole
#      bf16 and 4-bit models on the Triton backend;
#   2. the grouped-GEMM microbenchmark (bench_moe_gemm.py) with --check and --graphs (CUDA-graph capture proves no
#      host sync) on the OLMoE, Qwen3-30B-A3B and Mixtral expert shapes, decode and prefill, 0/50% dropped, 0/50%
#      skipped, its floor from the measured bandwidth and matmul rate;
#   3. end-to-end speed of a shrunk Mixtral-8x7B preset (random weights), bf16 and 4-bit, against transformers;
#   4. the main job (`moekern paper`) at the paper's GPU settings on the shipped model.
# Run from the source tree on a CUDA machine with torch, triton and transformers (no network needed):
#   benchmarks/gpu_check.sh OUT_DIR
# Every stage has its own time limit and writes as it goes; a stage that fails does not stop the next. Compare the
# kernel figures with the static report (benchmarks/results/static/report.md: issue-rate ceilings from the SASS) and
# commit what is worth keeping under benchmarks/results/ with the device, versions and commit they name.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python}

$PY - <<'EOF' > "$OUT/environment.json"
import json, subprocess, torch, triton, transformers
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "transformers": transformers.__version__, "cuda": torch.version.cuda,
                  "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip() or None}))
EOF

echo "== 0. the device's ceilings (copy bandwidth, bf16 matmul)"
timeout 60 $PY benchmarks/bench_moe_gemm.py --measure-peaks --out "$OUT/peaks.json" 2>&1 | tail -n 3
read -r PEAK_GBPS PEAK_TFLOPS < <($PY -c "import json; p = json.load(open('$OUT/peaks.json')); \
print(p['copy_gbps'], p['bf16_tflops'])" 2>/dev/null || echo "4800 989")
echo "copy ${PEAK_GBPS} GB/s, bf16 matmul ${PEAK_TFLOPS} TFLOP/s"

echo "== 1. kernel tests on the GPU"
MOEKERN_TEST_GPU=1 timeout 240 $PY -m pytest -q -x -p no:cacheprovider tests/test_ops_moe_gemm.py \
  tests/test_ops_routing.py tests/test_align_block_size.py tests/test_ops_backend.py 2>&1 | tee "$OUT/gpu_tests.log"

echo "== 2. grouped-GEMM microbenchmark"
timeout 180 $PY benchmarks/bench_moe_gemm.py --check --graphs --models olmoe_1b_7b qwen3_30b_a3b mixtral_8x7b \
  --tokens 1 16 256 2048 --dropped 0 0.5 --skipped 0 0.5 --peak-gbps "$PEAK_GBPS" --peak-tflops "$PEAK_TFLOPS" \
  --out "$OUT/moe_gemm_cuda.json" 2>&1 | tail -n 100

echo "== 3. end to end: Mixtral-8x7B preset, 4 layers"
timeout 50 $PY -m moekern bench mixtral-8x7b --layers 4 --batch-sizes 1,16 --out "$OUT/bench" 2>&1 | tail -n 20
timeout 50 $PY -m moekern bench mixtral-8x7b --layers 4 --recipe rtn4 --batch-sizes 1,16 --out "$OUT/bench" 2>&1 \
  | tail -n 20

echo "== 4. the main job at the GPU settings"
timeout 120 $PY -m moekern paper --device cuda --dtype bfloat16 --out "$OUT/paper" 2>&1 | tail -n 30
