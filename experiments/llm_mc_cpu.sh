#!/usr/bin/env bash
# SmolLM2-135M next-token multiple choice on a CPU (LoRA on the top blocks, the frozen prefix cached) x methods x
# seeds {0, 1, 2} -> paper/tables/llm_mc_cpu.{md,tex,csv} (+ figures), results store paper/results/llm_mc_cpu/.
#   BAYESLORA_DATA=/path/to/data experiments/llm_mc_cpu.sh [Hydra overrides, e.g. data=arc_easy]
# The stages (each a resumable Hydra multirun, in priority order) are the experiment config's `stages`
# (configs/experiment/llm_mc_cpu.yaml); re-run the same command after an interruption: finished runs are skipped
# and the MAP adapters come from the committed MAP cache. TASKS="sst2_demo openbookqa" (the default) lists the tasks.
source "$(dirname "$0")/common.sh"
TASKS=${TASKS:-"sst2_demo openbookqa"}
STAGES_OF='import sys; from bayeslora.run import study_stages; print("\n".join(map(" ".join, study_stages(sys.argv[1:]))))'
mapfile -t STAGES < <("$BIN/python" -c "$STAGES_OF" experiment=llm_mc_cpu)
for task in $TASKS; do
  for stage in "${STAGES[@]}"; do
    read -r -a overrides <<< "$stage"
    nice -n 10 "${RUN[@]}" -m experiment=llm_mc_cpu "data=$task" "${overrides[@]}" "$@"
  done
done
"${TABLES[@]}" paper/results/llm_mc_cpu --model smollm2-135m --out paper/tables --name llm_mc_cpu --figures \
  --columns winogrande_s arc_challenge arc_easy winogrande_m openbookqa boolq \
  --rows map temperature mc_dropout ensemble last_layer_laplace kfac_laplace kfac_laplace_val vi_lowrank vi_blob
