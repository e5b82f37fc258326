#!/usr/bin/env bash
# MiniLM (sequence classification) on the six tasks of the Laplace-LoRA / BLoB in-distribution table, CPU
# -> paper/tables/minilm_paper_tasks.{md,tex,csv}. Expect chance-level (†) cells on the 4-choice and WinoGrande
# tasks. Same knobs as minilm_calibration.sh (METHODS, ENSEMBLE_K); about twice its CPU time.
#   BAYESLORA_DATA=/path/to/data experiments/minilm_paper_tasks.sh [Hydra overrides]
source "$(dirname "$0")/common.sh"
METHODS=${METHODS:-map,temperature,checkpoint_ensemble,mc_dropout,last_layer_laplace,kfac_laplace,vi_meanfield,vi_blob}
ENSEMBLE_K=${ENSEMBLE_K:-3}
nice -n 10 "${RUN[@]}" -m experiment=minilm_paper_tasks "method=$METHODS" "$@"
if [ "$ENSEMBLE_K" -gt 0 ]; then
  nice -n 10 "${RUN[@]}" -m experiment=minilm_paper_tasks method=ensemble "method.k=$ENSEMBLE_K" "$@"
fi
"${TABLES[@]}" results/minilm_paper_tasks --model minilm --out paper/tables --name minilm_paper_tasks --figures \
  --columns winogrande_s arc_challenge arc_easy winogrande_m openbookqa boolq \
  --rows map temperature mc_dropout checkpoint_ensemble ensemble last_layer_laplace kfac_laplace vi_meanfield vi_blob
