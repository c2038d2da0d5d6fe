#!/usr/bin/env bash
# Line coverage of pytest_moe, measured in every process the tests start.
#
# Why not `pytest --cov`: the plugin is imported by its pytest11 entry point before pytest-cov starts,
# and the processes the tests start (pytester subprocesses, the janitor, forked lease holders) are not
# measured, so it reports about half the real figure.  Here coverage starts first (`coverage run`), and
# `patch = ["subprocess", "_exit"]` in pyproject.toml's [tool.coverage.run] makes every child Python
# process record its own data file (through coverage's .pth hook), which `coverage combine` merges.
#
#   bash scripts/coverage.sh                 # the whole README test suite (real vLLM CPU servers too)
#   bash scripts/coverage.sh --fast          # everything but test_e2e_cpu.py and test_faults.py
#   bash scripts/coverage.sh test/plugin/test_server.py -k port   # any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    # shellcheck disable=SC1091
    . "${PYTEST_MOE_VENV:-.venv}/bin/activate"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's pytest_moe, in children too
data="$PWD/.coverage-data"
rm -rf "$data" && mkdir -p "$data"
export COVERAGE_FILE="$data/coverage"
if [[ "${1:-}" == "--fast" ]]; then
    shift
    set -- test/plugin --ignore=test/plugin/test_e2e_cpu.py --ignore=test/plugin/test_faults.py "$@"
fi
[[ $# -gt 0 ]] || set -- test/plugin
status=0
python -m coverage run -m pytest "$@" -p no:cacheprovider -q || status=$?
python -m coverage combine --quiet "$data"
python -m coverage report --sort=cover
echo "coverage data: $COVERAGE_FILE (pytest exit status $status)"
exit "$status"
