#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (no network; benchmarks/README.md says how wheels travel):
#   bash benchmarks/gpu_check.sh STAGE...   STAGE = tests | tune | ops | text | model | autotune | profile | data | all
# (TESTS_FILTER, MODEL_BENCH_FILTER, DATA_BENCH_FILTER: pytest -k expressions for those stages)
# Each stage builds what is missing (the C++/CUDA extension for this machine's torch), runs its
# GPU tests or benchmarks, writes JSON and logs under $OUT and prints a short table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vitaclip-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
bash benchmarks/device_stage.sh
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! python3 -c "import vitaclip, vitaclip._C" 2>/dev/null; then
  start=$(date +%s)
  if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/build.log" 2>&1; then
    grep -iE "error" "$OUT/build.log" | head -20
    echo "EXTENSION BUILD FAILED: installing without it"
    VITACLIP_DISABLE_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
  fi
  echo "built vitaclip in $(( $(date +%s) - start )) s"
fi
python3 -c "import torch, triton, vitaclip; print('torch', torch.__version__, 'triton', triton.__version__, 'extension', vitaclip.extension_available(), 'backends', vitaclip.available_backends())"

bench() {  # bench NAME pytest-args...
  local name=$1; shift
  # tee first: a run cut short by the call's time limit still leaves its log under $OUT
  python3 -m pytest "$@" -q -p no:cacheprovider --benchmark-json="$OUT/bench-$name.json" 2>&1 | tee "$OUT/bench-$name.log" | tail -n 25
  [ -f "$OUT/bench-$name.json" ] && python3 benchmarks/summarize.py "$OUT/bench-$name.json"
}

for stage in "${@:-all}"; do
case $stage in
  tests|all)
    python3 -m pytest tests -m gpu -q -p no:cacheprovider -k "not test_data_gpu${TESTS_FILTER:+ and ($TESTS_FILTER)}" 2>&1 | tail -n 40 | tee "$OUT/tests.log" ;;&
  tune|all)
    OUT=$OUT python3 -m pytest benchmarks/test_attention_configs_bench.py -q -s -p no:cacheprovider 2>&1 | tail -n 16 ;;&
  ops|all)
    bench ops benchmarks/test_attention_bench.py benchmarks/test_summary_bench.py benchmarks/test_layer_bench.py ;;&
  text|all)
    bench text benchmarks/test_text_bench.py ;;&
  model|all)
    bench model benchmarks/test_model_bench.py ${MODEL_BENCH_FILTER:+-k "$MODEL_BENCH_FILTER"} ;;&
  autotune)  # not in "all": minutes of GEMM tuning; compare with the "model" stage of the same call
    VITACLIP_COMPILE_MODE=max-autotune-no-cudagraphs bench model-autotune benchmarks/test_model_bench.py \
      -k "graphed and not test_training_step" ;;&
  profile)  # not in "all": a diagnosis, not a figure
    python3 benchmarks/profile_model.py 2>&1 | tee "$OUT/profile.log" ;;&
  data|all)
    python3 -m pytest tests/test_data_gpu.py -q -p no:cacheprovider 2>&1 | tail -n 20 | tee "$OUT/tests-data.log"
    bench data benchmarks/test_loader_bench.py -s ${DATA_BENCH_FILTER:+-k "$DATA_BENCH_FILTER"} ;;
esac
done
