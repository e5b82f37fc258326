#!/usr/bin/env bash
# The whole pipeline at CPU size (what tests/test_pipeline.py and tests/test_ood.py run in CI):
# tiny random BERT x {sst2, rte} x {map, temperature} x seeds {0, 1} -> tables + figures, and the OOD protocol
# with a tiny random Llama (OpenBookQA -> ARC-C, MMLU college_chemistry) -> the OOD table.
# About 1-2 minutes on 2 CPU cores. Numbers are meaningless (random 2-layer models); every stage runs.
#   BAYESLORA_DATA=/path/to/data experiments/cpu_pipeline.sh [Hydra overrides]
source "$(dirname "$0")/common.sh"
"${RUN[@]}" -m experiment=cpu_pipeline "$@"
"${TABLES[@]}" results/cpu_pipeline --ts --out results/cpu_pipeline/tables --name cpu_pipeline --figures
"${RUN[@]}" -m experiment=ood_cpu "$@"
"${TABLES[@]}" results/ood_cpu --layout ood --ts --out results/ood_cpu/tables --name ood_cpu --figures
