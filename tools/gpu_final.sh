#!/usr/bin/env bash
# One device call that validates a change end to end on the GPU machine:
# build, GPU tests (wgmma kernels, then FLASH_ATTN_DISABLE_SM90=1 for the mma.sync
# ones), the wheel factory on one cell with its smoke gate (GPU numeric check
# included), compute-sanitizer, and the benchmark. Logs land in $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t() { echo "== $1: $(( $(date +%s) - start )) s"; }
start=$(date +%s)
FLASH_ATTN_CUDA_ARCHS=90 MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
t build
start=$(date +%s)
python3 -m pytest -q -m gpu tests -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head; tail -n 1 "$OUT/gpu_tests.log"; t "gpu tests (sm90)"
start=$(date +%s)
(cd /tmp && rm -rf fw && mkdir fw) 
python3 -m scripts.factory --out /tmp/fw/dist --work /tmp/fw/work wheels \
  --matrix "local kernels=ci" --toolchain system > "$OUT/factory.log" 2>&1
echo "factory exit $?"; tail -n 25 "$OUT/factory.log"
cp -r /tmp/fw/dist/whl/manifest.json "$OUT/" 2>/dev/null
find /tmp/fw -name "*.log" -path "*smoke*" -exec cp {} "$OUT/" \; 2>/dev/null
t factory
start=$(date +%s)
FLASH_ATTN_DISABLE_SM90=1 python3 -m pytest -q -m gpu tests -p no:cacheprovider > "$OUT/gpu_tests_sm80path.log" 2>&1
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests_sm80path.log" | head; tail -n 1 "$OUT/gpu_tests_sm80path.log"; t "gpu tests (mma.sync path)"
start=$(date +%s)
compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/sanitizer_case.py > "$OUT/sanitizer.log" 2>&1
echo "sanitizer exit $?"; tail -n 2 "$OUT/sanitizer.log"; t sanitizer
start=$(date +%s)
python3 benchmarks/bench_attention.py ${BENCH_ARGS:-} --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
grep "^| [0-9]* | [TF]" "$OUT/bench.log" | cut -d'|' -f2-4,7,12; t bench
