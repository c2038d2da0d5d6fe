#!/usr/bin/env bash
# Mutation testing as a printed measure: how many deliberate small bugs in the core modules the fast
# suite (everything but test_e2e_cpu.py and test_faults.py, which boot real servers) catches.
#
# mutmut (configured in pyproject.toml's [tool.mutmut]) copies the package into mutants/, rewrites each
# function of the core modules into mutated variants, records which tests reach which function, and
# runs only those tests against each variant.  Prints the killed share per module and every survivor
# with its diff.  Slow (hours for all modules on 2 cores): not part of CI; its figure goes in reports.
#
#   bash scripts/bench_mutation.sh                 # all core modules
#   bash scripts/bench_mutation.sh janitor results # some of them
#   MUTATION_JOBS=1 bash scripts/bench_mutation.sh janitor   # fewer parallel test processes
#   MUTATION_FRESH=1 bash scripts/bench_mutation.sh          # forget earlier verdicts and bookkeeping
#
# After the tests change, start over with MUTATION_FRESH=1: mutmut 3.8's incremental bookkeeping (new tests
# only) failed on this suite (BadTestExecutionCommandsException).
#
# Known limit: a function reached only inside a child process (a pytester subprocess, the janitor
# started by a server) is not seen by mutmut's per-test bookkeeping, so its mutants show as
# "no tests"; they count against the share, never for it.
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
# Child processes (pytester subprocesses, the janitor) import the mutated copy, not this checkout, and run
# the mutant under test (mutmut passes it in MUTANT_UNDER_TEST).  While mutmut records which test reaches
# which function ("stats"), a child cannot report its hits and would fail looking for mutmut's config in
# its own working directory: this sitecustomize makes such a child run the original code instead.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
cat > "$site/sitecustomize.py" <<'PY'
import os

if os.environ.get("MUTANT_UNDER_TEST") == "stats":
    os.environ["MUTANT_UNDER_TEST"] = ""
PY
export PYTHONPATH="$PWD/mutants:$site"
# In a session of its own: a mutant of the teardown code (server.kill_tree, _members, _signal_group) can signal
# the process group or tree of whoever runs it, and once ended the shell that ran this script.
setsid -w python -m mutmut run --max-children "${MUTATION_JOBS:-$(nproc)}" "${globs[@]}"
python -m mutmut results --all true > mutants/results.txt
python - "${modules[@]}" <<'PY'
import re
import subprocess
import sys
from collections import Counter, defaultdict

wanted = sys.argv[1:]
by_module: dict[str, Counter] = defaultdict(Counter)
survivors: list[str] = []
for line in open("mutants/results.txt"):
    match = re.match(r"\s*(pytest_moe\.((?:plugins\.)?\w+)\.x\S+): (.+)$", line)
    if not match or match.group(2) not in wanted:
        continue
    name, module, status = match.groups()
    by_module[module][status] += 1
    if status not in ("killed", "timeout"):
        survivors.append(f"{name}: {status}")
total = Counter()
print(f"{'module':<10} {'mutants':>7} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} {'other':>6} {'killed share':>12}")
for module in wanted:
    c = by_module[module]
    total.update(c)
    n = sum(c.values())
    other = n - c["killed"] - c["timeout"] - c["survived"] - c["no tests"]
    share = f"{100 * (c['killed'] + c['timeout']) / n:.1f} %" if n else "-"
    print(f"{module:<10} {n:>7} {c['killed']:>7} {c['timeout']:>7} {c['survived']:>8} {c['no tests']:>8} {other:>6} {share:>12}")
n = sum(total.values())
if n:
    print(f"{'total':<10} {n:>7} {'':>7} {'':>7} {'':>8} {'':>8} {'':>6} {100 * (total['killed'] + total['timeout']) / n:>10.1f} %")
print(f"\nsurviving mutants ({len(survivors)}; killed share counts timeouts as killed):")
for entry in survivors:
    print(entry)
    name = entry.split(":")[0]
    diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True).stdout
    print("".join(f"    {line}\n" for line in diff.splitlines() if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))))
PY
