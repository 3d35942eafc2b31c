#!/usr/bin/env bash
# One device call: build for sm_90, then the steps asked for, each ending in a one-line
# summary (also appended to $OUT/summary.txt). Every log goes to $OUT/logs.tgz, packed
# again after each step ($OUT: the device tool's folder, or ./gpu_out).
#   STEPS="build test sanitize bench" bash tools/gpu_session.sh            (the default)
#   STEPS="build test test_n8 test_busy racecheck synccheck" REPEAT=3 bash tools/gpu_session.sh
#
# Steps:
#   build       the extension in place (FLASH_ATTN_CUDA_ARCHS, default 90)
#   test        the GPU tests in one process
#   test_n8     the GPU tests under `pytest -n $WORKERS` (default 8; needs pytest-xdist)
#   test_busy   the GPU tests in one process while tools/gpu_load.py keeps the GPU busy
#               (started before, killed after; both reported)
#   poison      times the NaN poisoning of the CUDA cache that the tests use
#   sanitize    compute-sanitizer memcheck on tools/sanitizer_case.py
#   racecheck, synccheck, initcheck    the other compute-sanitizer tools on it
#   factory     `wheels` on one cell with the system toolchain (its smoke gate runs the
#               GPU numeric check)
#   bench       benchmarks/bench_attention.py
# Each step but build, factory and bench has an _sm80 variant (test_sm80, test_n8_sm80,
# racecheck_sm80, ...): the same with FLASH_ATTN_DISABLE_SM90=1, the mma.sync kernels
# on an sm_90 GPU. Without the suffix a step honours FLASH_ATTN_DISABLE_SM90 from the
# environment (default 0: the wgmma kernels).
# Knobs: REPEAT (each test step n times in a row, fresh processes; default 1),
# PYTEST_ARGS (default: tests), WORKERS (8), LOAD_SECONDS (900), LOAD_STREAMS (2),
# LOAD_SIZE (8192), SANITIZER_KERNELS (racecheck/synccheck only check kernels matching
# it; default kns=_ZN5flash, our kernels; empty: all), SANITIZER_NO_CACHING (1: memcheck
# without the CUDA caching allocator, so that it sees each tensor's bounds; initcheck
# always), FLASH_ATTN_TEST_POISON (tests/gpu_poison.py; default 1).
set -uo pipefail
OUT=${OUT:-gpu_out}
LOGS=${LOGS:-/tmp/gpu_session_logs}
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-"build test sanitize bench"}
REPEAT=${REPEAT:-1}
WORKERS=${WORKERS:-8}
SANITIZER_KERNELS=${SANITIZER_KERNELS-kns=_ZN5flash}
SUMMARY="$OUT/summary.txt"
read -r -a PYTEST_PATHS <<< "${PYTEST_ARGS:-tests}"
LOAD_PID=""

case $REPEAT in '' | *[!0-9]* | 0) echo "REPEAT must be a positive integer; got '$REPEAT'"; exit 2 ;; esac
case $WORKERS in '' | *[!0-9]* | 0) echo "WORKERS must be a positive integer; got '$WORKERS'"; exit 2 ;; esac
VALID="build test test_n8 test_busy poison sanitize racecheck synccheck initcheck factory bench"
for step in $STEPS; do
  base=${step%_sm80}
  case " $VALID " in *" $base "*) ;; *) echo "unknown step $step; valid: $VALID (and each but build, factory, bench with _sm80)"; exit 2 ;; esac
  case $base in build | factory | bench)
    [ "$base" = "$step" ] || { echo "unknown step $step: $base has no _sm80 variant"; exit 2; } ;;
  esac
done

note() { echo "$*" | tee -a "$SUMMARY"; }
pack_logs() { tar -czf "$OUT/logs.tgz.part" -C "$LOGS" . && mv "$OUT/logs.tgz.part" "$OUT/logs.tgz"; }
cleanup() {
  if [ -n "$LOAD_PID" ] && kill -0 "$LOAD_PID" 2>/dev/null; then kill -TERM "$LOAD_PID"; wait "$LOAD_PID"; fi
  pack_logs
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# "passed P, failed F, skipped S, errors E" from a pytest log's closing line
pytest_counts() {
  local line kind n out=""
  line=$(grep -E "[0-9]+ (passed|failed|skipped|errors?|deselected)" "$1" | grep -E " in [0-9.]+s" | tail -1)
  [ -n "$line" ] || { echo "no pytest summary line"; return; }
  for kind in passed failed skipped error; do
    n=$(grep -oE "[0-9]+ ${kind}" <<< "$line" | grep -oE "^[0-9]+" || true)
    out+="${out:+, }${kind/error/errors} ${n:-0}"
  done
  echo "$out"
}

# the sanitizer's closing line and the case's own verdict, from a sanitizer log
sanitizer_summary() {
  local tool_line case_line
  tool_line=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$1" | tail -1 | sed 's/^=* *//')
  case_line=$(grep -E "^sanitizer_case: " "$1" | tail -1)
  echo "${tool_line:-no sanitizer summary line}; ${case_line:-sanitizer_case: no verdict}"
}

run_tests() {  # tag run [pytest args]: the GPU tests; returns pytest's exit status
  local tag=$1 run=$2 log rc
  shift 2
  log="$LOGS/${tag}_r${run}.log"
  FLASH_ATTN_DISABLE_SM90=$DISABLE python3 -m pytest -q -m gpu -p no:cacheprovider "$@" \
    "${PYTEST_PATHS[@]}" > "$log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" "$log" | head -30
  TEST_COUNTS="$(pytest_counts "$log") (pytest exit $rc)"
  return $rc
}

step_test() {  # tag run
  run_tests "$1" "$2"
  local rc=$?
  note "$1 run $2/$REPEAT: $TEST_COUNTS"
  return $rc
}

step_test_n8() {  # tag run
  if ! python3 -c "import xdist" 2> /dev/null; then
    note "$1 run $2/$REPEAT: pytest-xdist is not installed; put its wheel and execnet's into .whl/"
    return 1
  fi
  run_tests "$1" "$2" -n "$WORKERS"
  local rc=$?
  note "$1 run $2/$REPEAT ($WORKERS workers): $TEST_COUNTS"
  return $rc
}

step_test_busy() {  # tag run
  local tag=$1 run=$2 load_log rc waited=0 alive load_line
  load_log="$LOGS/${tag}_r${run}_load.log"
  FLASH_ATTN_DISABLE_SM90=$DISABLE python3 tools/gpu_load.py --seconds "${LOAD_SECONDS:-900}" \
    --streams "${LOAD_STREAMS:-2}" --size "${LOAD_SIZE:-8192}" > "$load_log" 2>&1 &
  LOAD_PID=$!
  until grep -q "^gpu_load: running" "$load_log"; do
    if ! kill -0 "$LOAD_PID" 2> /dev/null; then
      grep -q "^gpu_load: running" "$load_log" && break  # it ran, and ended already
      note "$tag run $run/$REPEAT: the load did not start: $(tail -1 "$load_log")"
      return 1
    fi
    if [ $waited -ge 180 ]; then
      note "$tag run $run/$REPEAT: the load was not running after 180 s: $(tail -1 "$load_log")"
      kill -TERM "$LOAD_PID"
      wait "$LOAD_PID"
      LOAD_PID=""
      return 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  run_tests "$tag" "$run"
  rc=$?
  if kill -0 "$LOAD_PID" 2> /dev/null; then
    alive="alive to the end"
    kill -TERM "$LOAD_PID"
  else
    alive="ENDED BEFORE THE TESTS"
    rc=1
  fi
  wait "$LOAD_PID"
  LOAD_PID=""
  load_line=$(grep -E "^gpu_load: [0-9]+ " "$load_log" | tail -1)
  note "$tag run $run/$REPEAT: $TEST_COUNTS; load $alive: ${load_line:-$(tail -1 "$load_log")}"
  return $rc
}

step_sanitizer() {  # tag tool
  local tag=$1 tool=$2 log="$LOGS/$1.log" rc nocache=0
  local args=(--tool "$tool" --error-exitcode 9)
  case $tool in
    racecheck | synccheck) [ -z "$SANITIZER_KERNELS" ] || args+=(--kernel-name "$SANITIZER_KERNELS") ;;
    memcheck) nocache=${SANITIZER_NO_CACHING:-1} ;;
    initcheck) nocache=1 ;;
  esac
  if [ "$nocache" = 1 ]; then
    FLASH_ATTN_DISABLE_SM90=$DISABLE PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer "${args[@]}" python3 tools/sanitizer_case.py > "$log" 2>&1
  else
    FLASH_ATTN_DISABLE_SM90=$DISABLE compute-sanitizer "${args[@]}" python3 tools/sanitizer_case.py > "$log" 2>&1
  fi
  rc=$?
  note "$tag: $(sanitizer_summary "$log") (exit $rc)"
  return $rc
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
note "gpu_session $(date -u +%FT%TZ): STEPS='$STEPS' REPEAT=$REPEAT FLASH_ATTN_TEST_POISON=${FLASH_ATTN_TEST_POISON:-1}"
failed=0
for step in $STEPS; do
  start=$(date +%s)
  base=${step%_sm80}
  if [ "$base" != "$step" ]; then DISABLE=1; else DISABLE=${FLASH_ATTN_DISABLE_SM90:-0}; fi
  step_failed=0
  case $base in
    build)
      FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} \
        python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; note "build: FAILED"; exit 1; }
      tail -6 "$LOGS/build.log"
      note "build: ok" ;;
    test | test_n8 | test_busy)
      passed=0
      for run in $(seq "$REPEAT"); do
        if "step_$base" "$step" "$run"; then passed=$((passed + 1)); fi
        pack_logs
      done
      [ $passed -eq "$REPEAT" ] || step_failed=1
      [ "$REPEAT" -eq 1 ] || note "$step: $passed/$REPEAT runs passed" ;;
    poison)
      FLASH_ATTN_DISABLE_SM90=$DISABLE python3 tests/gpu_poison.py > "$LOGS/poison.log" 2>&1 || step_failed=1
      note "$step: $(tail -1 "$LOGS/poison.log" | sed 's/^poison: //')" ;;
    sanitize) step_sanitizer "$step" memcheck || step_failed=1 ;;
    racecheck | synccheck | initcheck) step_sanitizer "$step" "$base" || step_failed=1 ;;
    factory)
      rm -rf /tmp/fw
      python3 -m scripts.factory --out /tmp/fw/dist --work /tmp/fw/work wheels \
        --matrix "${FACTORY_MATRIX:-local kernels=ci}" --toolchain system > "$LOGS/factory.log" 2>&1
      rc=$?
      tail -n 25 "$LOGS/factory.log"
      cp /tmp/fw/dist/whl/manifest.json "$OUT/" 2> /dev/null
      [ $rc -eq 0 ] || step_failed=1
      note "factory: exit $rc" ;;
    bench)
      read -r -a bench_args <<< "${BENCH_ARGS:-}"
      python3 benchmarks/bench_attention.py "${bench_args[@]}" --json "$OUT/bench.json" > "$LOGS/bench.log" 2>&1 || step_failed=1
      tail -50 "$LOGS/bench.log"
      note "bench: see bench.json" ;;
  esac
  failed=$((failed + step_failed))
  note "== $step took $(($(date +%s) - start)) s$([ $step_failed -eq 0 ] || echo ' (FAILED)')"
  pack_logs
done
note "gpu_session: $(wc -w <<< "$STEPS") steps, $failed failed"
[ $failed -eq 0 ]
