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
# the table's arguments are the manifest's (tests/test_committed_tables.py regenerates it from the same)
TABLE_ARGS='import json; print("\n".join(json.load(open("paper/tables/manifest.json"))["tables"]["llm_mc_cpu"]))'
mapfile -t ARGS < <("$BIN/python" -c "$TABLE_ARGS")
"${TABLES[@]}" "${ARGS[@]}" --out paper/tables --figures
