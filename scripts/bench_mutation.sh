#!/usr/bin/env bash
# Mutation testing as a printed measure: how many deliberate small bugs in the core modules the fast
# suite (everything but test_e2e_cpu.py and test_faults.py, which boot real servers) catches.
#
# mutmut (configured in pyproject.toml's [tool.mutmut]) copies the package into mutants/, rewrites each
# function of the core modules into mutated variants, records which tests reach which function, and
# runs only those tests against each variant.  Prints the killed share per module and every survivor
# with its diff.  Slow (most of a day for all modules on 2 cores; one to two hours for a 10 % sample): not part of
# CI; its figure goes in reports.
#
#   bash scripts/bench_mutation.sh                 # all core modules
#   bash scripts/bench_mutation.sh janitor results # some of them
#   MUTATION_JOBS=1 bash scripts/bench_mutation.sh janitor   # fewer parallel test processes
#   MUTATION_FRESH=1 bash scripts/bench_mutation.sh          # forget earlier verdicts and bookkeeping
#   MUTATION_SAMPLE=0.1 MUTATION_SEED=0 bash scripts/bench_mutation.sh   # a seeded 10 % sample of each module
#   MUTATION_CAP_S=90 ...                          # stop a mutant whose tests all pass after 90 s (default 240)
#
# After the tests change, start over with MUTATION_FRESH=1: mutmut 3.8's incremental bookkeeping (new tests
# only) failed on this suite (BadTestExecutionCommandsException).
#
# How a sampled mutant is judged (mutation_report.py): its function's tests run with the module's own test files first,
# then fastest first; each test has a limit of 30 s plus three times its unmutated call (a hang fails that test, a
# timeout, which counts as killed); a run past MUTATION_CAP_S is a survivor unless its tests do not even collect within
# 90 s (a hang in rule loading).  Each run has its own --basetemp, and whatever still works in it afterwards is killed.
#
# A function reached only inside a child process (a pytester subprocess, the janitor started by a server) is not
# seen by mutmut's per-test bookkeeping; scripts/mutation_site/sitecustomize.py records those hits, and
# mutation_report.py runs such a function's mutants against the tests that reach it that way too (with the
# sample).  A mutant no test reaches at all shows as "no tests" and counts against the share, never for it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    # shellcheck disable=SC1091
    . "${PYTEST_MOE_VENV:-.venv}/bin/activate"
fi
# plugin.py is glue since the plugin split: the outcome path lives in plugins/recording.py, collection and
# markers in plugins/collection.py; redaction, retries, the no-GPU skip and the waivers' strict outcome have their
# own modules.
core=(results errors preflight server janitor runner plugin plugins.recording plugins.collection bench report redact retries selection waivers gpus matrix)
modules=("${@:-${core[@]}}")
globs=()
for module in "${modules[@]}"; do
    [[ " ${core[*]} " == *" $module "* ]] || { echo "error: $module is not a core module (${core[*]})" >&2; exit 2; }
    globs+=("pytest_moe.${module}.*")
done
# mutmut keeps its per-test bookkeeping ("stats", a run of the whole fast suite: about 13 minutes here) and
# every verdict in mutants/, and redoes only what changed: keep it between runs of one module after another.
# MUTATION_FRESH=1 starts over.  It must exist when Python starts, being on PYTHONPATH.
[[ -z "${MUTATION_FRESH:-}" ]] || rm -rf mutants
mkdir -p mutants
# mutmut 3.8 regenerates the mutated modules and re-copies test/, but leaves a package file it copied once (the
# data YAML, the corpus, modules it does not mutate) as it was: bring those up to date, or the tests run against
# stale data (seen: a rule added to error_patterns.yaml missing under mutmut, and its stats run failing).
python - <<'PY'
import shutil
import tomllib
from pathlib import Path

mutated = set(tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"])
for src in Path("pytest_moe").rglob("*"):
    dst = Path("mutants") / src
    if src.is_file() and "__pycache__" not in src.parts and str(src) not in mutated and dst.parent.is_dir():
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copy2(src, dst)
PY
# Child processes (pytester subprocesses, the janitor, servers) import the mutated copy, not this checkout, and run
# the mutant under test (mutmut passes it in MUTANT_UNDER_TEST).  While mutmut records which test reaches which
# function ("stats"), scripts/mutation_site/sitecustomize.py makes each child record its own hits, under the test
# that started it (mutation_stats_plugin.py names it), in mutants/child-hits.jsonl (mutmut cannot see them; kept
# with its stats, gone with MUTATION_FRESH).
export PYTEST_MOE_MUTATION_HITS="$PWD/mutants/child-hits.jsonl"
export PYTEST_PLUGINS=mutation_stats_plugin
export PYTHONPATH="$PWD/mutants:$PWD/scripts/mutation_site"
# In a session of its own: a mutant of the teardown code (server.kill_tree, _members, _signal_group) can signal
# the process group or tree of whoever runs it, and once ended the shell that ran this script.  As root a mutant
# of the process-tree walk (_members) can signal any process on the machine: run this as an unprivileged user.
jobs="${MUTATION_JOBS:-$(nproc)}"
if [[ -n "${MUTATION_SAMPLE:-}" ]]; then
    # A seeded, stratified sample (scripts/mutation_report.py says why, and why it runs the sample itself): generate
    # every mutant and the per-test bookkeeping by running one cheap mutant, draw the sample from the full list.
    setsid -w python -m mutmut run --max-children "$jobs" "pytest_moe.selection.x_decide__mutmut_1" > /dev/null
    python -m mutmut results --all true > mutants/all.txt
    python scripts/mutation_report.py draw mutants/all.txt "$MUTATION_SAMPLE" "${MUTATION_SEED:-0}" "${modules[@]}" \
        > mutants/sample.txt
    python scripts/mutation_report.py run mutants/sample.txt "$jobs" > mutants/results.txt
    sample=(mutants/sample.txt mutants/all.txt)
else
    setsid -w python -m mutmut run --max-children "$jobs" "${globs[@]}"
    python -m mutmut results --all true > mutants/results.txt
    sample=()
fi
python scripts/mutation_report.py report mutants/results.txt "${sample[@]}" -- "${modules[@]}"
