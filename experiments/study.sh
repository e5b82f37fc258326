#!/usr/bin/env bash
# Any study whose stages are in its experiment config: runs every stage (a resumable Hydra multirun each; finished
# runs are skipped), then its table from the arguments in paper/tables/manifest.json.
#   BAYESLORA_DATA=/path/to/data experiments/study.sh <experiment> [Hydra overrides]
#   e.g. experiments/study.sh minilm_vi_tuning ; experiments/study.sh minilm_ablation
source "$(dirname "$0")/common.sh"
STUDY=${1:?usage: experiments/study.sh <experiment, e.g. minilm_ablation> [Hydra overrides]}
shift
STAGES_OF='import sys; from bayeslora.run import study_stages; print("\n".join(map(" ".join, study_stages(sys.argv[1:]))))'
mapfile -t STAGES < <("$BIN/python" -c "$STAGES_OF" "experiment=$STUDY")
if [ ${#STAGES[@]} -eq 0 ]; then echo "experiment=$STUDY has no stages (configs/experiment/$STUDY.yaml)" >&2; exit 2; fi
for stage in "${STAGES[@]}"; do
  read -r -a overrides <<< "$stage"
  nice -n 10 "${RUN[@]}" -m "experiment=$STUDY" "${overrides[@]}" "$@"
done
TABLE_ARGS='import json, sys; m = json.load(open("paper/tables/manifest.json")); t = {**m.get("pending", {}), **m["tables"]}; print("\n".join(t.get(sys.argv[1], [])))'
mapfile -t ARGS < <("$BIN/python" -c "$TABLE_ARGS" "$STUDY")
if [ ${#ARGS[@]} -eq 0 ]; then echo "paper/tables/manifest.json has no table '$STUDY': add its arguments there" >&2; exit 2; fi
"${TABLES[@]}" "${ARGS[@]}" --out paper/tables
