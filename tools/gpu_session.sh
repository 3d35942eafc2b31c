#!/usr/bin/env bash
# One device call: build for sm_90, then the steps asked for. Logs go to $OUT (device
# tool) or ./gpu_out.
#   STEPS="build test sanitize bench" bash tools/gpu_session.sh            (the default)
#   STEPS="build test test_sm80 factory sanitize bench" bash tools/gpu_session.sh
# test: the GPU tests (wgmma kernels on sm_90); test_sm80: the same with
# FLASH_ATTN_DISABLE_SM90=1 (the mma.sync kernels); factory: `wheels` on one cell with
# the system toolchain, whose smoke gate runs the GPU numeric check.
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
    test|test_sm80)
      disable=$([ "$step" = test_sm80 ] && echo 1 || echo 0)
      FLASH_ATTN_DISABLE_SM90=$disable python3 -m pytest -q -m gpu ${PYTEST_ARGS:-tests} \
        -p no:cacheprovider > "$OUT/gpu_$step.log" 2>&1
      grep -E "^(FAILED|ERROR)" "$OUT/gpu_$step.log" | head -30; tail -3 "$OUT/gpu_$step.log" ;;
    factory)
      rm -rf /tmp/fw
      python3 -m scripts.factory --out /tmp/fw/dist --work /tmp/fw/work wheels \
        --matrix "${FACTORY_MATRIX:-local kernels=ci}" --toolchain system > "$OUT/factory.log" 2>&1
      echo "factory exit $?"; tail -n 25 "$OUT/factory.log"
      cp /tmp/fw/dist/whl/manifest.json "$OUT/" 2>/dev/null ;;
    sanitize)
      compute-sanitizer --tool memcheck --error-exitcode 9 python3 tools/sanitizer_case.py > "$OUT/sanitizer.log" 2>&1
      echo "sanitizer exit $?"; tail -4 "$OUT/sanitizer.log" ;;
    bench)
      python3 benchmarks/bench_attention.py ${BENCH_ARGS:-} --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
      tail -50 "$OUT/bench.log" ;;
    *) echo "unknown step $step; valid: build test test_sm80 factory sanitize bench"; exit 2 ;;
  esac
  echo "== $step took $(( $(date +%s) - start )) s"
done
