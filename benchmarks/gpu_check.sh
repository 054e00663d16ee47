#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (no network; benchmarks/README.md says how wheels travel):
#   bash benchmarks/gpu_check.sh STAGE...   STAGE = tests | tune | ops | text | model | autotune | profile | data | all
# (TESTS_FILTER, MODEL_BENCH_FILTER, TEXT_BENCH_FILTER, DATA_BENCH_FILTER: pytest -k expressions for those stages)
# Each stage builds what is missing (the C++/CUDA extension for this machine's torch), runs its
# GPU tests or benchmarks and prints a short table. Under $OUT: one log of everything
# (gpu_check.log, written as it goes, so a call cut short by its time limit keeps what ran) and one
# JSON per benchmark stage: at most 8 files in all, as many as the device tool brings back.
# Warnings stay on (only their summary is cut): pyproject.toml makes a failed CUDA graph capture,
# which would otherwise fall back to the uncaptured pass with a warning, an error in tests and benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/vitaclip-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
bash benchmarks/device_stage.sh 2>&1 | tee -a "$LOG"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
# A warm machine keeps the extension built by an earlier call (ignored files stay there), and the
# marker of a failed build: both hold for the sources they were built from only. Their hash decides:
# sources changed since (a fix between two calls of one session) build again.
SOURCES=$(cat setup.py $(find csrc -type f | sort) | sha256sum | cut -c1-16)
STATE=${GPU_CHECK_STATE:-/tmp}  # what outlives a call on a warm machine
BUILT=$STATE/vitaclip-extension-sources  # the hash of the sources of the last build (or failed build)
NO_EXT=$STATE/vitaclip-no-extension  # a failed build is not retried by later calls on this machine...
[ "$(cat "$BUILT" 2>/dev/null)" = "$SOURCES" ] || rm -f "$NO_EXT"  # ...unless the sources changed
# torch first: `import vitaclip` no longer imports it, and vitaclip._C alone cannot find libc10.so
if { [ "$(cat "$BUILT" 2>/dev/null)" != "$SOURCES" ] || ! python3 -c "import torch; import vitaclip, vitaclip._C" 2>/dev/null; } \
    && [ ! -e "$NO_EXT" ]; then
  start=$(date +%s)
  # an earlier call's objects and library: ninja and build_ext judge by times, which a copied tree's
  # files need not follow
  rm -rf vitaclip/_C.*.so build/temp.*
  if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /tmp/vitaclip-build.log 2>&1; then
    grep -iE "error" /tmp/vitaclip-build.log | head -20 | tee -a "$LOG"
    echo "EXTENSION BUILD FAILED: installing without it" | tee -a "$LOG"
    touch "$NO_EXT"
    VITACLIP_DISABLE_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
  fi
  echo "$SOURCES" > "$BUILT"
  echo "built vitaclip in $(( $(date +%s) - start )) s" | tee -a "$LOG"
fi
python3 -c "import torch, triton, vitaclip; from vitaclip.ops import summary_ext; print('torch', torch.__version__, 'triton', triton.__version__, 'extension kernels for', sorted(summary_ext.KERNEL_DEVICES), 'runs on this GPU', summary_ext.runs_on(torch.device('cuda')), 'backends', vitaclip.available_backends())" 2>&1 | tee -a "$LOG"
# every model builds its class prompts with open_clip's tokenizer: without it each stage would only error
python3 -c "import open_clip" 2>/dev/null || { echo "open_clip missing: carry .whl/gpu/p1 (benchmarks/README.md)" | tee -a "$LOG"; exit 1; }

run() {  # run LINES command...: the whole output into the log first, its last LINES lines here
  local lines=$1; shift
  echo "== $*" >> "$LOG"
  "$@" 2>&1 | tee -a "$LOG" | tail -n "$lines"
}

bench() {  # bench NAME pytest-args...
  local name=$1; shift
  run 25 python3 -m pytest "$@" -q -p no:cacheprovider --disable-warnings --benchmark-json="$OUT/bench-$name.json"
  [ -f "$OUT/bench-$name.json" ] && python3 benchmarks/summarize.py "$OUT/bench-$name.json" | tee -a "$LOG"
}

for stage in "${@:-all}"; do
case $stage in
  tests|all)
    run 40 python3 -m pytest tests -m gpu -q -p no:cacheprovider --disable-warnings \
      -k "not test_data_gpu${TESTS_FILTER:+ and ($TESTS_FILTER)}" ;;&
  tune|all)
    run 16 python3 -m pytest benchmarks/test_attention_configs_bench.py -q -s -p no:cacheprovider --disable-warnings ;;&
  ops|all)
    bench ops benchmarks/test_attention_bench.py benchmarks/test_summary_bench.py benchmarks/test_layer_bench.py ;;&
  text|all)
    bench text benchmarks/test_text_bench.py ${TEXT_BENCH_FILTER:+-k "$TEXT_BENCH_FILTER"} ;;&
  model|all)
    bench model benchmarks/test_model_bench.py ${MODEL_BENCH_FILTER:+-k "$MODEL_BENCH_FILTER"} ;;&
  autotune)  # not in "all": minutes of GEMM tuning; compare with the "model" stage of the same call
    VITACLIP_COMPILE_MODE=max-autotune-no-cudagraphs bench model-autotune benchmarks/test_model_bench.py \
      -k "graphed and not test_training_step" ;;&
  profile)  # not in "all": a diagnosis, not a figure
    run 200 python3 benchmarks/profile_model.py ;;&
  data|all)
    run 20 python3 -m pytest tests/test_data_gpu.py -q -p no:cacheprovider --disable-warnings
    bench data benchmarks/test_loader_bench.py -s ${DATA_BENCH_FILTER:+-k "$DATA_BENCH_FILTER"} ;;
esac
done
