#!/usr/bin/env bash
# The plugin's own tests: unit, pytester, and end-to-end runs against real vLLM CPU servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${PYTEST_MOE_VENV:-.venv}/bin/activate"
exec python -m pytest test/plugin -p no:cacheprovider -rfEs "$@"
