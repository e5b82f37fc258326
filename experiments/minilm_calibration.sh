#!/usr/bin/env bash
# MiniLM (22.7M encoder, sequence classification) x {RTE, BoolQ, SST-2} x methods x seeds {0, 1, 2}, CPU
# -> paper/tables/minilm_calibration.{md,tex,csv} and its reliability / risk-coverage figures.
#   BAYESLORA_DATA=/path/to/data experiments/minilm_calibration.sh [Hydra overrides, e.g. seed=0]
# Stages in priority order (each a resumable Hydra multirun; the MAP runs fill the MAP cache the post-hoc methods
# load): MAP / temperature / K-FAC Laplace (marglik prior), K-FAC Laplace with the validation-NLL prior
# (row kfac_laplace_val), the VI guides, the deep ensemble (k=ENSEMBLE_K, ENSEMBLE_K=0 skips it), the remaining
# baselines. Re-run the same command after an interruption: finished runs are skipped.
# CPU time: see experiments/README.md (hours on 2 cores; device=auto on a GPU machine: minutes).
# STUDY=minilm_paper_tasks runs the same stages on the six tasks of the Laplace-LoRA / BLoB table (that study's
# experiment config sets the tasks; the results store is shared) -> paper/tables/minilm_paper_tasks.*.
source "$(dirname "$0")/common.sh"
STUDY=${STUDY:-minilm_calibration}
ENSEMBLE_K=${ENSEMBLE_K:-3}
SAMPLES=${SAMPLES:-8}   # predictive samples of VI and MC dropout in this CPU study
case "$STUDY" in
  minilm_calibration) COLUMNS=(rte boolq sst2) ;;
  minilm_paper_tasks) COLUMNS=(winogrande_s arc_challenge arc_easy winogrande_m openbookqa boolq) ;;
  *) echo "STUDY: expected minilm_calibration or minilm_paper_tasks, got '$STUDY'" >&2; exit 2 ;;
esac
sweep() { nice -n 10 "${RUN[@]}" -m "experiment=$STUDY" "$@"; }
sweep method=map,temperature,kfac_laplace "$@"
sweep method=kfac_laplace method.prior_fit=val_nll method_label=kfac_laplace_val "$@"
sweep method=vi_blob,vi_meanfield,vi_lowrank "++method.n_samples=$SAMPLES" "$@"  # ++: the primary config (method=map) has no n_samples
if [ "$ENSEMBLE_K" -gt 0 ]; then
  sweep method=ensemble "method.k=$ENSEMBLE_K" "$@"
fi
sweep method=last_layer_laplace,checkpoint_ensemble "$@"
sweep method=mc_dropout "method.n_samples=$SAMPLES" "$@"
"${TABLES[@]}" results/minilm_calibration --model minilm --out paper/tables --name "$STUDY" --figures \
  --columns "${COLUMNS[@]}" \
  --rows map temperature mc_dropout checkpoint_ensemble ensemble last_layer_laplace kfac_laplace kfac_laplace_val \
  vi_meanfield vi_lowrank vi_blob
