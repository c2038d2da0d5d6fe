"""Loaded by every Python process of a mutation run: ``bench_mutation.sh`` puts this folder on ``PYTHONPATH``.

Why: while mutmut records which test reaches which function ("stats"), a child process (a pytester subprocess,
the janitor, the stand-in engine, a server the plugin starts) cannot report to mutmut, and mutmut's own recorder
fails there looking for its config in the child's working directory.  Those functions then showed as reached by
no test, or only by the in-process tests, and their mutants were never run against the tests that do reach them
(the thread-timeout path, a two-node launch in a pytester run).  So a child records its hits itself: each function
the first time it is reached, under the test that started the child, as a JSON line in the file named by
``PYTEST_MOE_MUTATION_HITS``; ``mutation_report.py`` adds those tests to each function's own.
"""

import json
import os

#: The running test, set by mutation_stats_plugin.py in the process mutmut runs and inherited down the tree.
_TEST_VAR = "PYTEST_MOE_MUTATION_TEST"


def _install() -> None:
    if os.environ.get("MUTANT_UNDER_TEST") != "stats":
        return  # a mutant run (the child runs that mutant too), or the stats process itself starting up
    hits = os.environ.get("PYTEST_MOE_MUTATION_HITS")
    test = os.environ.get(_TEST_VAR)
    if not hits or not test:
        os.environ["MUTANT_UNDER_TEST"] = ""  # no test to credit: run the original code
        return
    from mutmut.mutation import trampoline

    seen: set[str] = set()

    def record(name: str, caller: str | None = None) -> None:
        if name not in seen:  # appended at once: a child may end in os._exit or SIGKILL
            seen.add(name)
            with open(hits, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"test": test, "function": name}) + "\n")

    trampoline.record_trampoline_hit = record


_install()
