#!/usr/bin/env bash
# The one script a session lent a GPU runs (at most about 10 minutes of wall time), writing JSON the repo commits:
#   1. python -m bayeslora.bench all --size 1b and --size 7b with --compare (peak memory per operation, laplace-torch
#      and bayesian-lora in the same process);
#   2. SmolLM2-135M on OpenBookQA with all-layer LoRA: MAP, K-FAC Laplace, temperature scaling, seed 0, and its table.
#
#   experiments/gpu_check.sh              on the GPU machine (see ../shared/gpu/README.md: carry .gpu/wheels with the
#                                         packages it lacks, .gpu/data/openbookqa and the SmolLM2 GGUF, SMOLLM2=<path>)
#   experiments/gpu_check.sh --size tiny  the same steps at toy size on a CPU in about two minutes
#                                         (tests/test_gpu_check.py runs it, so the script cannot rot)
# Output: ${OUT:-paper/bench/gpu}/ bench_<size>.json, results/ (each run's metrics.json + predictions), obqa.md/.csv,
# summary.json (what ran, exit codes, wall times).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE=gpu
if [[ "${1:-}" == "--size" ]]; then SIZE=${2:?--size needs tiny or gpu}; fi
case "$SIZE" in tiny|gpu) ;; *) echo "--size: expected tiny or gpu, got '$SIZE'" >&2; exit 2 ;; esac
OUT=${OUT:-paper/bench/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
if [[ -d .gpu/wheels ]]; then  # the lent machine lacks pyro, laplace-torch, datasets, hydra, gguf: carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" .gpu/wheels/*.whl
  export PYTHONPATH="$HOME/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [[ "$SIZE" == tiny ]]; then
  SIZES=(tiny)
  BENCH=(--repeats 1 --warmup 0 --steps 2 --fit-batches 2 --samples 4 --glm-samples 64 --seq-len 32)
  RUN=(model=tiny_llama data=sst2_demo data.max_train=64 data.max_eval=64 train.epochs=1 train.batch_size=16)
  BUDGET=300
else
  SIZES=(1b 7b)
  BENCH=(--repeats 3 --warmup 1)
  : "${BAYESLORA_DATA:=$PWD/.gpu/data}"
  export BAYESLORA_DATA
  RUN=(experiment=llm_mc data=openbookqa "model.name=${SMOLLM2:-smollm2-135m}" train.epochs=3 train.batch_size=16)
  BUDGET=330
fi

summary="{"
step() {  # step <name> <timeout seconds> <command...>: run it, record exit code and wall time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "gpu_check: $name rc=$rc $((SECONDS - t0)) s" >&2
  summary+="\"$name\": {\"rc\": $rc, \"wall_s\": $((SECONDS - t0))}, "
}

for size in "${SIZES[@]}"; do
  step "bench_$size" 150 "$PY" -m bayeslora.bench all --size "$size" --compare "${BENCH[@]}" --quiet \
    --out "$OUT/bench_$size.json"
done
step obqa_run "$BUDGET" "$PY" -m bayeslora.run -m "${RUN[@]}" method=map,kfac_laplace,temperature seed=0 \
  "results_dir=$OUT/results" eval.reliability_diagram=false hydra.sweep.dir="$OUT/multirun"
step obqa_table 60 "$PY" -m bayeslora.tables "$OUT/results" --out "$OUT" --name obqa --metrics acc ece nll
summary+="\"size\": \"$SIZE\"}"
echo "$summary" > "$OUT/summary.json"
cat "$OUT/summary.json"
