#!/usr/bin/env bash
# The main job on a machine without a GPU: the CPU smoke matrix on the real vLLM CPU build.
# Writes performance_profiles_neurips_traces/{success,failure}_results.json, logs, traces and junit.xml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${PYTEST_MOE_VENV:-.venv}/bin/activate"
exec python -m pytest test/nightly --moe-matrix test/nightly/smoke_matrix.yaml --moe-profile \
  --junitxml performance_profiles_neurips_traces/junit.xml -rA "$@"
