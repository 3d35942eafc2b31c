#!/usr/bin/env bash
# One device call: build for sm_90, run the GPU tests, compute-sanitizer on a
# small forward+backward, and the benchmark. Logs go to $OUT (device tool) or ./gpu_out.
#   STEPS="build test sanitize bench" bash tools/gpu_session.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-"build test sanitize bench"}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
for step in $STEPS; do
  start=$(date +%s)
  case $step in
    build)
      FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} \
        python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      tail -6 "$OUT/build.log" ;;
    test)
      python3 -m pytest -q -m gpu ${PYTEST_ARGS:-tests} -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
      grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -30; tail -3 "$OUT/gpu_tests.log" ;;
    sanitize)
      compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/sanitizer_case.py > "$OUT/sanitizer.log" 2>&1
      echo "sanitizer exit $?"; tail -4 "$OUT/sanitizer.log" ;;
    bench)
      python3 benchmarks/bench_attention.py ${BENCH_ARGS:-} --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
      tail -50 "$OUT/bench.log" ;;
  esac
  echo "== $step took $(( $(date +%s) - start )) s"
done
