#!/usr/bin/env bash
# MiniLM (22.7M encoder, sequence classification) x {RTE, BoolQ, SST-2} x methods x seeds {0, 1, 2}, CPU
# -> paper/tables/minilm_calibration.{md,tex,csv} and its reliability / risk-coverage figures.
#   BAYESLORA_DATA=/path/to/data experiments/minilm_calibration.sh [Hydra overrides, e.g. seed=0]
# The stages (each a resumable Hydra multirun, in priority order) are the experiment config's `stages` list
# (configs/experiment/minilm_calibration.yaml). Re-run the same command after an interruption: finished runs are
# skipped. CPU time: see experiments/README.md (hours on 2 cores; device=auto on a GPU machine: minutes).
# STUDY=minilm_paper_tasks runs the same stages on the six tasks of the Laplace-LoRA / BLoB table (that study's
# experiment config sets the tasks; the results store is shared) -> paper/tables/minilm_paper_tasks.*.
source "$(dirname "$0")/common.sh"
STUDY=${STUDY:-minilm_calibration}
case "$STUDY" in
  minilm_calibration | minilm_paper_tasks) ;;
  *) echo "STUDY: expected minilm_calibration or minilm_paper_tasks, got '$STUDY'" >&2; exit 2 ;;
esac
sweep() { nice -n 10 "${RUN[@]}" -m "experiment=$STUDY" "$@"; }
STAGES_OF='import sys; from bayeslora.run import study_stages; print("\n".join(map(" ".join, study_stages(sys.argv[1:]))))'
mapfile -t STAGES < <("$BIN/python" -c "$STAGES_OF" "experiment=$STUDY")
for stage in "${STAGES[@]}"; do
  read -r -a overrides <<< "$stage"
  sweep "${overrides[@]}" "$@"
done
# the table's arguments are the manifest's (tests/test_committed_tables.py regenerates it from the same)
TABLE_ARGS='import json, sys; m = json.load(open("paper/tables/manifest.json")); t = {**m.get("pending", {}), **m["tables"]}; print("\n".join(t.get(sys.argv[1], [])))'
mapfile -t ARGS < <("$BIN/python" -c "$TABLE_ARGS" "$STUDY")
if [ ${#ARGS[@]} -eq 0 ]; then echo "paper/tables/manifest.json has no table '$STUDY': add its arguments there" >&2; exit 2; fi
"${TABLES[@]}" "${ARGS[@]}" --out paper/tables --figures
