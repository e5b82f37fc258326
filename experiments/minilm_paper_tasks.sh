#!/usr/bin/env bash
# MiniLM (sequence classification) on the six tasks of the Laplace-LoRA / BLoB in-distribution table (WG-S, ARC-C,
# ARC-E, WG-M, OBQA, BoolQ), CPU: the stages and protocol of minilm_calibration.sh, whose results store it shares
# (BoolQ is run once) -> paper/tables/minilm_paper_tasks.{md,tex,csv} and figures. Expect chance-level (†) cells
# on the 4-choice and WinoGrande tasks. Same knobs as minilm_calibration.sh (ENSEMBLE_K, SAMPLES).
#   BAYESLORA_DATA=/path/to/data experiments/minilm_paper_tasks.sh [Hydra overrides]
STUDY=minilm_paper_tasks exec "$(dirname "$0")/minilm_calibration.sh" "$@"
