"""Draw a mutant sample and print the killed share per module, for scripts/bench_mutation.sh.

Why a sample: the whole sweep over the core modules is about 5 700 mutants, and a mutant reached by the pytester
or stand-in-engine tests costs 8-60 s, so all of them take most of a day on 2 cores.  A seeded random sample drawn
from each module in proportion to its size (stratified) gives an unbiased estimate of each module's and the overall
killed share, with its 95 % interval, in one to two hours (594 mutants: about 100 minutes); `draw` makes it,
`report` prints it.  Without a sample file `report` counts every mutant mutmut has a verdict for.

    python scripts/mutation_report.py draw RESULTS FRACTION SEED MODULE...   # prints the sampled names
    python scripts/mutation_report.py run SAMPLE JOBS > VERDICTS              # run them (from mutants/'s parent)
    python scripts/mutation_report.py recheck VERDICTS JOBS > VERDICTS2       # check the cap-stopped ones for a hang
    python scripts/mutation_report.py report RESULTS [SAMPLE ALL] -- MODULE...   # the table and the survivors

Why `run` and not `mutmut run NAMES`: mutmut first runs the union of the named mutants' tests once, unmutated, in its
own process and in its own order; for a sample spread over every module that union is nearly the whole fast suite,
and it stopped there with a usage error (exit 4) in 2 tries out of 2.  `run` uses what mutmut made (the mutated
copy in mutants/ and its record of which test reaches which function) and gives each mutant a pytest process of
its own, in a session of its own, with that function's tests fastest first: exit 1 is killed, 0 survived, past the
time limit a timeout.
"""

from __future__ import annotations

import getpass
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"\s*(pytest_moe\.((?:plugins\.)?\w+)\.x\S+): (.+)$")
KILLED = ("killed", "timeout")
#: The longest one mutant's tests may run (see run_sample); MUTATION_CAP_S changes it.
CAP_S = int(os.environ.get("MUTATION_CAP_S", "240"))
#: Collecting every test of the fast suite took 7 s on a loaded 2-core machine; 90 s is a hang, not a slow start.
COLLECT_LIMIT_S = 90
HUNG = f"timeout (collecting its tests did not end in {COLLECT_LIMIT_S} s)"
#: Set in each pytest run's environment, so whatever it leaves running can be found (``_kill_leftovers``).
RUN_TAG = "PYTEST_MOE_MUTATION_RUN"


def killed(status: str) -> bool:
    """Killed, timed out, or stopped pytest from starting where it starts without the mutant ("killed (pytest exit
    4)", "timeout (collecting …)")."""
    return status.partition(" (")[0] in KILLED


def read_results(path: str, wanted: list[str]) -> dict[str, tuple[str, str]]:
    """Mutant name -> (module, status), from `mutmut results --all true` output, for the wanted modules."""
    verdicts = {}
    for line in Path(path).read_text().splitlines():
        match = LINE.match(line)
        if match and match.group(2) in wanted:
            name, module, status = match.groups()
            verdicts[name] = (module, status)
    return verdicts


def draw(verdicts: dict[str, tuple[str, str]], fraction: float, seed: int) -> list[str]:
    """Each module's share of the sample is its share of the mutants (at least 10 where it has them)."""
    by_module: dict[str, list[str]] = defaultdict(list)
    for name, (module, _) in verdicts.items():
        by_module[module].append(name)
    rng = random.Random(seed)
    sample = []
    for module in sorted(by_module):
        names = sorted(by_module[module])
        sample += rng.sample(names, min(len(names), max(10, math.ceil(fraction * len(names)))))
    return sample


class _Runs:
    """pytest runs over the mutated copy in mutants/, each in a session of its own, with one mutant switched on."""

    def __init__(self) -> None:
        stats = json.loads(Path("mutants/mutmut-stats.json").read_text())
        self.durations = stats["duration_by_test"]
        self.reaching_tests = tests_by_function(stats, Path("mutants/child-hits.jsonl"))
        site = Path(__file__).resolve().parent / "mutation_site"
        self.env = dict(os.environ, PYTHONPATH=f"{Path('mutants').resolve()}:{site}",
                        PYTEST_MOE_MUTATION_STATS=str(Path("mutants/mutmut-stats.json").resolve()))
        # the stats-only plugin: it must not run in mutant runs, not even in their pytester subprocesses
        self.env.pop("PYTEST_PLUGINS", None)
        # the mutated modules hold every variant of every function: compiling them took 6 of a run's 11 s; their
        # bytecode is the same for every mutant (MUTANT_UNDER_TEST picks one at call time), so let Python cache it
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self._runs = itertools.count()

    def tests(self, name: str) -> list[str]:
        function = re.sub(r"__mutmut_\d+$", "", name)
        return test_order(function, self.reaching_tests.get(function, set()), self.durations)

    def pytest(self, mutant: str, tests: list[str], limit: float) -> int | None:
        """pytest's exit status with ``mutant`` switched on ("" for none), or None past ``limit`` seconds."""
        tag = f"{os.getpid()}-{next(self._runs)}"
        # a temporary folder of the run's own: the tests' servers work in it, which names this run's orphans
        basetemp = Path(tempfile.gettempdir(), f"pytest-moe-mutation-{getpass.getuser()}", tag)
        command = [sys.executable, "-m", "pytest", "-x", "-q", "--tb=no", "-p", "no:cacheprovider", "-p", "no:randomly",
                   "-p", "no:xdist", f"--basetemp={basetemp}", *tests]
        with subprocess.Popen(command, cwd="mutants", env=dict(self.env, MUTANT_UNDER_TEST=mutant, **{RUN_TAG: tag}),
                              start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
            try:
                return process.wait(limit)
            except subprocess.TimeoutExpired:
                return None
            finally:
                # the whole session: servers and janitors the tests started, and a mutant that forgot to stop them
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
                _kill_leftovers(tag, basetemp)
                shutil.rmtree(basetemp, ignore_errors=True)

    def hangs(self, name: str) -> bool:
        """For a run stopped at the cap: a mutant that hangs before any test runs (rule loading at import, which every
        test collects) times out collecting them too, and is a timeout; otherwise tests were still passing."""
        return self.pytest(name, ["--collect-only", *self.tests(name)], COLLECT_LIMIT_S) is None

    def verdict(self, name: str) -> str:
        tests = self.tests(name)
        if not tests:
            return "no tests"
        # a mutant in an infinite loop runs past three times its tests' time: a timeout, which counts as killed.  A
        # surviving mutant of a function every test reaches (matrix loading) would run the whole suite, about 15
        # minutes on one core: after CAP_S it stops and counts as survived, so the share is a lower bound.  A mutant
        # that makes one test hang (a teardown that waits forever) fails that test at its own limit, so the run goes on
        # to a verdict instead of to the cap (mutation_timeouts_plugin.py)
        natural = 60 + 3 * sum(self.durations.get(t, 0) for t in tests)
        code = self.pytest(name, ["-p", "mutation_timeouts_plugin", *tests], min(natural, CAP_S))
        if code is None and natural > CAP_S:
            return HUNG if self.hangs(name) else f"survived (stopped after {CAP_S} s)"
        if code in (None, 0, 1):
            return {None: "timeout", 0: "survived", 1: "killed"}[code]
        # pytest stopped before or outside the tests (a usage or internal error: a mutant of the rule parser breaks the
        # plugin's start); that is the mutant's doing only if the same tests start without it.  Collecting them is
        # enough to know (the suite passes unmutated), and for a function every test reaches, running them all again
        # would not end within the cap
        clean = self.pytest("", ["--collect-only", *tests], CAP_S)
        return f"killed (pytest exit {code})" if clean == 0 else f"suspicious (exit {code}; {clean} without the mutant)"


def run_sample(sample: list[str], jobs: int) -> None:
    """Each mutant's verdict as a `name: status` line (the format `mutmut results` prints), in sample order."""
    from concurrent.futures import ThreadPoolExecutor

    runs = _Runs()
    with ThreadPoolExecutor(jobs) as pool:
        for name, status in zip(sample, pool.map(runs.verdict, sample)):
            print(f"    {name}: {status}", flush=True)


def recheck_stopped(results: str, jobs: int) -> None:
    """The verdicts of ``results`` again, with each mutant stopped at the cap checked for a hang (``_Runs.hangs``):
    for a run made before that check existed."""
    from concurrent.futures import ThreadPoolExecutor

    runs = _Runs()
    lines = Path(results).read_text().splitlines()

    def again(line: str) -> str:
        name, _, status = line.strip().partition(": ")
        return f"    {name}: {HUNG}" if status.startswith("survived (stopped") and runs.hangs(name) else line

    with ThreadPoolExecutor(jobs) as pool:
        for line in pool.map(again, lines):
            print(line, flush=True)


#: Test files that exercise a module most directly, where they are not named ``test_<module>.py``.
OWN_TESTS = {
    "runner": ("test_runner", "test_cell", "test_retries", "test_outcomes"),
    "server": ("test_server", "test_teardown"),
    "janitor": ("test_teardown",),
    "plugin": ("test_collection", "test_outcomes"),
    "plugins.recording": ("test_outcomes", "test_retries", "test_waivers"),
    "plugins.collection": ("test_collection", "test_selection"),
}


def test_order(function: str, reaching: set[str], durations: dict[str, float]) -> list[str]:
    """The module's own test files first, then the rest; fastest first within each.

    Fastest first is mutmut's order: most mutants die in the first few tests.  But a function every test reaches (a
    plugin hook, ``config_of``) has ~2 000 of them, and the pytester test that pins its behaviour ran after minutes of
    unrelated fast tests, past the cap (28 of one sample's 55 survivors were stopped there).  The suite runs in any
    order under xdist, so no test leans on another having run first."""
    module = re.match(r"pytest_moe\.((?:plugins\.)?\w+)\.x", function).group(1)
    own = OWN_TESTS.get(module, (f"test_{module.rsplit('.', 1)[-1]}",))

    def key(test: str) -> tuple[bool, float, str]:
        return Path(test.split("::")[0]).stem not in own, durations.get(test, 0), test

    return sorted(reaching, key=key)


def tests_by_function(stats: dict, child_hits: Path) -> dict[str, set[str]]:
    """mutmut's record of the tests that reach each function, plus those that reach it only in a child process
    (recorded by scripts/mutation_site/sitecustomize.py while mutmut took its stats)."""

    reaching = {function: set(tests) for function, tests in stats["tests_by_mangled_function_name"].items()}
    if child_hits.exists():
        for line in child_hits.read_text().splitlines():
            try:
                hit = json.loads(line)
            except ValueError:
                continue  # a line cut short by a child killed mid-write
            reaching.setdefault(hit["function"], set()).add(hit["test"])
    return reaching


def _kill_leftovers(tag: str, basetemp: Path) -> None:
    """Servers a run started in sessions of their own outlive its session when a teardown mutant breaks the cleanup
    (seen: fake vLLM servers left by `_members` mutants, which failed the next end-to-end run's "no vLLM server is
    running" guard); they carry the run's tag in their environment.

    Not every leftover can be read that way: a process that retitles itself (vLLM's ``VLLM::Worker_TP1``, through
    setproctitle) overwrites the memory ``/proc/PID/environ`` shows.  One such worker, left by a mutant of the
    two-member vLLM test, outlived a sample and failed a verification run's fault tests.  So a process working in
    the run's own ``--basetemp`` is a leftover too, once the run is over (the other job's are in its own folder;
    an orphan of any run is no sign: a test that kills pytest on purpose leaves orphaned janitors doing their job)."""
    import psutil

    inside = str(basetemp) + os.sep
    for proc in psutil.process_iter():
        try:
            if proc.uids().real != os.getuid():
                continue
            if proc.environ().get(RUN_TAG) == tag or (proc.cwd() + os.sep).startswith(inside):
                proc.kill()
        except psutil.Error:
            continue


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a share: sound at the small counts (10-80) a module's sample has."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def report(verdicts: dict[str, tuple[str, str]], sample: list[str] | None, wanted: list[str],
           everything: dict[str, tuple[str, str]]) -> None:
    """``everything``: every mutant of the modules (the population a sample was drawn from)."""
    population = Counter(module for module, _ in everything.values())
    def module_of(name: str) -> str:
        return re.match(r"pytest_moe\.((?:plugins\.)?\w+)\.x", name).group(1)

    # a sampled mutant with no verdict yet (the run still going, or stopped) counts as not run
    chosen = ({name: verdicts.get(name, (module_of(name), "not checked")) for name in sample if module_of(name) in wanted}
              if sample else verdicts)
    measured = {name: v for name, v in chosen.items() if v[1] != "not checked"}
    if len(measured) < len(chosen):
        print(f"{len(chosen) - len(measured)} mutants not run yet: left out of every figure below\n")
    counts: dict[str, Counter] = defaultdict(Counter)
    for module, status in measured.values():
        counts[module][status] += 1
    print(f"{'module':<20} {'mutants':>7} {'measured':>8} {'killed':>6} {'survived':>8} {'no tests':>8} {'other':>5}"
          f" {'killed share':>12} {'95 % interval':>15}")
    estimate = 0.0
    for module in wanted:
        c = counts[module]
        n = sum(c.values())
        if not n:
            print(f"{module:<20} {population[module]:>7} {0:>8}")
            continue
        dead = sum(count for status, count in c.items() if killed(status))
        alive = sum(count for status, count in c.items() if status.startswith("survived"))
        other = n - dead - alive - c["no tests"]
        low, high = wilson(dead, n)
        estimate += population[module] * dead / n
        print(f"{module:<20} {population[module]:>7} {n:>8} {dead:>6} {alive:>8} {c['no tests']:>8} {other:>5}"
              f" {100 * dead / n:>10.1f} % {100 * low:>6.1f}-{100 * high:.1f} %")
    total_n = sum(sum(c.values()) for c in counts.values())
    total_killed = sum(count for c in counts.values() for status, count in c.items() if killed(status))
    if total_n:
        overall = estimate / sum(population[m] for m in wanted if counts[m])
        print(f"{'total':<20} {sum(population.values()):>7} {total_n:>8} {total_killed:>6}"
              f"{'':>26} {100 * overall:>10.1f} %  (each module weighted by its mutants)")
    survivors = sorted(name for name, (_, status) in measured.items() if not killed(status))
    print(f"\nsurviving mutants ({len(survivors)}; timeouts count as killed):")
    for name in survivors:
        print(f"{name}: {measured[name][1]}")
        diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True).stdout
        print("".join(f"    {line}\n" for line in diff.splitlines()
                      if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))))


def main(argv: list[str]) -> None:
    if argv[0] == "run":
        run_sample(Path(argv[1]).read_text().split(), int(argv[2]))
    elif argv[0] == "recheck":
        recheck_stopped(argv[1], int(argv[2]))
    elif argv[0] == "draw":
        results, fraction, seed, *wanted = argv[1:]
        print("\n".join(draw(read_results(results, wanted), float(fraction), int(seed))))
    else:
        split = argv.index("--")
        results, *rest = argv[1:split]
        wanted = argv[split + 1:]
        verdicts = read_results(results, wanted)
        if rest:
            sample_file, all_file = rest
            report(verdicts, Path(sample_file).read_text().split(), wanted, read_results(all_file, wanted))
        else:
            report(verdicts, None, wanted, verdicts)


if __name__ == "__main__":
    main(sys.argv[1:])
