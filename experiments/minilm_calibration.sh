#!/usr/bin/env bash
# MiniLM (22.7M encoder, sequence classification) x {RTE, BoolQ, SST-2} x methods x seeds {0, 1, 2}, CPU
# -> paper/tables/minilm_calibration.{md,tex,csv} and its reliability / risk-coverage figures.
#   BAYESLORA_DATA=/path/to/data experiments/minilm_calibration.sh [Hydra overrides, e.g. seed=0]
# METHODS (comma list) picks the methods of the main sweep; ENSEMBLE_K=0 skips the deep ensemble (k=3 here: each
# member is a full MAP training). Resumable: re-run the same command after an interruption.
# Expected CPU time: see experiments/README.md (hours on 2 cores; device=auto on a GPU machine: minutes).
source "$(dirname "$0")/common.sh"
METHODS=${METHODS:-map,temperature,checkpoint_ensemble,mc_dropout,last_layer_laplace,kfac_laplace,vi_meanfield,vi_blob}
ENSEMBLE_K=${ENSEMBLE_K:-3}
nice -n 10 "${RUN[@]}" -m experiment=minilm_calibration "method=$METHODS" "$@"
if [ "$ENSEMBLE_K" -gt 0 ]; then
  nice -n 10 "${RUN[@]}" -m experiment=minilm_calibration method=ensemble "method.k=$ENSEMBLE_K" "$@"
fi
"${TABLES[@]}" results/minilm_calibration --model minilm --out paper/tables --name minilm_calibration --figures \
  --columns rte boolq sst2 \
  --rows map temperature mc_dropout checkpoint_ensemble ensemble last_layer_laplace kfac_laplace vi_meanfield vi_blob
