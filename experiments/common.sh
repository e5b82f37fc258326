# Sourced by the study scripts: repository root, offline settings, the data root and the venv binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${BAYESLORA_DATA:?set BAYESLORA_DATA to the data root laid out as <root>/<task>/<split>.jsonl}"
export BAYESLORA_DATA HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BIN=${BIN:-.venv/bin}
RUN=("$BIN/bayeslora-run")
TABLES=("$BIN/bayeslora-tables")
