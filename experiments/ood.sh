#!/usr/bin/env bash
# The papers' OOD protocol: SmolLM2-135M fine-tuned on OpenBookQA, the same posterior evaluated on ARC-C, ARC-E,
# MMLU college_chemistry and college_physics; ACC / ECE / NLL under shift and OOD-detection AUROC (entropy, MI).
# Seeds {0, 1, 2}, all methods, GPU -> paper/tables/ood.{md,tex,csv} and figures (one per shifted set).
#   BAYESLORA_DATA=/path/to/data experiments/ood.sh [Hydra overrides, e.g. hydra/launcher=parallel]
source "$(dirname "$0")/common.sh"
"${RUN[@]}" -m experiment=ood ${METHODS:+"method=$METHODS"} "$@"
"${TABLES[@]}" results/ood --model smollm2-135m --layout ood --out paper/tables --name ood --figures \
  --columns "openbookqa (ID)" arc_challenge arc_easy mmlu_chem mmlu_phys \
  --rows map temperature mc_dropout checkpoint_ensemble ensemble last_layer_laplace kfac_laplace vi_meanfield vi_blob
