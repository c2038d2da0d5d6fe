"""``python -m pytest_moe ...``: look at the matrix, a model, a plan or a log without running pytest.

* ``list [--moe-matrix PATH]`` — one line per config: id, markers, GPUs needed, full server command;
* ``classify LOGFILE`` — the error type of a server log, the name alone on one line;
* ``inspect PATH`` — a model's MoE description (from its config.json; never downloads) as JSON;
* ``preflight --model PATH --tp N ...`` — the verdict for one launch as JSON; exit 0 ok, 1 failure predicted
  (2, as for every command, is bad input: one ``error:`` line naming the option or file);
  ``preflight --score RESULTS_DIR`` — per rule, how often it was right on the configs that were booted;
* ``plan --model PATH --gpu H200 --gpus 8`` — every TP/EP/quantization/backend combination and its verdict;
* ``tiny`` — build the tiny checkpoints of the CPU smoke matrix;
* ``waivers [--moe-matrix PATH] [--moe-results-dir DIR]`` — every ``known_failures`` waiver with its issue,
  age, expiry and last outcome; exit 1 when one has expired or no longer fails.
* ``kernels [--moe-matrix PATH] [--gpu H200]`` — each config's fused-MoE shape and its tuned kernel config file.
* ``history import FILES...`` — load results JSON / JUnit files (or results directories) into the history;
* ``report --html OUT [--since 14d]`` — the morning report from the history, one self-contained HTML file;
* ``merge DIR... --out DIR`` — one results set from several jobs' results directories (seed 001's rules).
* ``submit --slurm-partition P [pytest selection args]`` — each selected config as one Slurm job (docs/slurm.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from datetime import date
from collections.abc import Sequence
from pathlib import Path

from pytest_moe.args import bounded_int, fraction, seconds
from pytest_moe.engines import engine_names
from pytest_moe.errors import classify_file
from pytest_moe.history.html import parse_since, write_report
from pytest_moe.history.imports import import_paths
from pytest_moe.history.merge import merge_dirs
from pytest_moe.history.regress import changes_markdown
from pytest_moe.history.store import HistoryError, HistoryStore, resolve_url
from pytest_moe.configs import HistorySettings
from pytest_moe.matrix import MAX_TP, MatrixError, load_matrix
from pytest_moe.models import ModelInspectionError, inspect_model
from pytest_moe.preflight import LaunchPlan, check, gpu_spec, plan_table, render_plan, verdict
from pytest_moe.results import DEFAULT_RESULTS_DIR
from pytest_moe.runner import display_command
from pytest_moe.scoring import render_score, score
from pytest_moe.slurm import SlurmError, SubmitOptions, submit_and_follow
from pytest_moe.tiny import ensure_tiny_model, tiny_model_specs
from pytest_moe.waivers import NEEDS_ATTENTION, list_waivers, render


def cmd_list(args: argparse.Namespace) -> int:
    for cfg in load_matrix(args.moe_matrix).configs:
        print(f"{cfg.id}\t{','.join(cfg.markers)}\tgpus={cfg.gpus_needed}\t{display_command(cfg)}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    print(classify_file(args.logfile).error_type)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    print(json.dumps(inspect_model(args.path).to_dict(), indent=2))
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    if args.score is not None:
        print(render_score(score(args.score)), end="")
        return 0
    if args.model is None or args.tp is None:
        build_parser().error("preflight needs --model and --tp (or --score RESULTS_DIR)")
    plan = LaunchPlan(
        engine=args.engine, tp=args.tp, ep=args.ep, quantization=args.quantization, moe_backend=args.backend,
        trust_remote_code=args.trust_remote_code, mem_fraction=args.mem_fraction,
    )
    gpu = gpu_spec(args.gpu, args.gpus or args.tp) if args.gpu else None
    result = verdict(check(inspect_model(args.model), plan, gpu), engine=args.engine)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def cmd_plan(args: argparse.Namespace) -> int:
    print(render_plan(plan_table(inspect_model(args.model), gpu_spec(args.gpu, args.gpus), engine=args.engine)))
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    for name in tiny_model_specs():
        print(ensure_tiny_model(name))
    return 0


def cmd_waivers(args: argparse.Namespace) -> int:
    today = date.today()
    waivers = list_waivers(load_matrix(args.moe_matrix), args.moe_results_dir)
    print(render(waivers, today))
    return NEEDS_ATTENTION if any(w.problem(today) for w in waivers) else 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the contract's one ``error:`` line (exit 2), not a usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def cmd_kernels(args: argparse.Namespace) -> int:
    from pytest_moe.gpus import discover_gpus
    from pytest_moe.kernels.naming import kernel_device_name
    from pytest_moe.kernels.table import kernel_rows, render_kernel_table

    gpu = args.gpu or next((g.name for g in discover_gpus()), None)
    if gpu:
        kernel_device_name(gpu)  # an unknown GPU is a usage error before any model is read
    print(render_kernel_table(kernel_rows(load_matrix(args.moe_matrix), gpu), gpu), end="")
    return 0


def _history_store(args: argparse.Namespace) -> HistoryStore:
    url = resolve_url(args.moe_history, os.environ.get("PYTEST_MOE_HISTORY"), None)
    if url is None:
        raise ValueError("the history is off ('off' given); pass --moe-history URL")
    return HistoryStore(url)


def _history_settings(args: argparse.Namespace) -> HistorySettings:
    path = args.moe_matrix or ("model_matrix.yaml" if os.path.exists("model_matrix.yaml") else None)
    return load_matrix(path).history if path else HistorySettings()


def cmd_history(args: argparse.Namespace) -> int:
    store = _history_store(args)
    for done in import_paths(store, [Path(p) for p in args.files]):
        state = "already imported" if done.skipped else f"{done.rows} rows"
        print(f"{done.source}: run {done.run_id}, {done.configs} entries, {state}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since else None
    data = write_report(_history_store(args), args.html, since, _history_settings(args))
    print(changes_markdown(data.changes), end="")
    print(f"report: {args.html} ({len(data.runs)} nights)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    merged = merge_dirs([Path(d) for d in args.dirs], Path(args.out))
    print(f"{args.out}: {merged.successes} successes, {merged.failures} failures, {merged.files} other files copied")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    opts = SubmitOptions(
        partition=args.slurm_partition, account=args.slurm_account, run_allowance_s=args.slurm_run_allowance,
        time_minutes=args.slurm_time, poll_s=args.slurm_poll, extra_sbatch=tuple(args.slurm_sbatch_arg),
    )
    try:
        return submit_and_follow(args.pytest_args, opts)
    except SlurmError as exc:
        return _usage_error(str(exc))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pytest_moe", description="pytest-moe command line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="print the matrix: id, markers, GPUs needed, server command")
    p.add_argument("--moe-matrix", default="model_matrix.yaml", metavar="PATH")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("classify", help="print the error type of a server log")
    p.add_argument("logfile")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("inspect", help="print a model's MoE description as JSON")
    p.add_argument("path", help="model directory, config.json, HF cache dir, or org/name already in the HF cache")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("preflight", help="predict whether one launch can work (exit 1 when it cannot)")
    p.add_argument("--model", default=None, metavar="PATH")
    p.add_argument("--tp", type=bounded_int(1, MAX_TP), default=None)
    p.add_argument("--ep", type=bounded_int(1, MAX_TP), default=1)
    p.add_argument("--quantization", default=None)
    p.add_argument("--backend", default=None, help="MoE backend (default: the engine's auto)")
    p.add_argument("--engine", default="sglang", choices=engine_names())
    p.add_argument("--gpu", default=None, help="GPU name, e.g. H200 (default: skip GPU-dependent rules)")
    p.add_argument("--gpus", type=bounded_int(1, MAX_TP), default=None, help="GPUs on the host (default: TP)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--mem-fraction", type=fraction, default=None)
    p.add_argument("--score", default=None, metavar="RESULTS_DIR",
                   help="instead: how often each rule was right on the booted configs recorded in RESULTS_DIR")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("plan", help="which TP/EP/quantization/backend combinations pass preflight")
    p.add_argument("--model", required=True, metavar="PATH")
    p.add_argument("--gpu", required=True, help="GPU name, e.g. H200")
    p.add_argument("--gpus", type=bounded_int(1, MAX_TP), default=8)
    p.add_argument("--engine", default="sglang", choices=engine_names())
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("submit", help="run each selected config as one Slurm job; other arguments select as in pytest",
                       usage="python -m pytest_moe submit --slurm-partition P [options] [pytest selection args]")
    p.add_argument("--slurm-partition", required=True, metavar="P")
    p.add_argument("--slurm-account", default=None, metavar="A")
    p.add_argument("--slurm-run-allowance", type=seconds(), default=1800.0, metavar="S",
                   help="seconds added to each config's launch timeout for its time limit (default: 1800)")
    p.add_argument("--slurm-time", type=bounded_int(1, 7 * 24 * 60), default=None, metavar="MIN", help="time limit in minutes for every job")
    p.add_argument("--slurm-poll", type=seconds(0, allow_zero=False), default=10.0, metavar="S", help="seconds between squeue polls (default: 10)")
    p.add_argument("--slurm-sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch argument, e.g. --slurm-sbatch-arg=--qos=high (repeatable)")
    p.set_defaults(func=cmd_submit, takes_pytest_args=True)

    p = sub.add_parser("tiny", help="build the tiny random-weight MoE checkpoints of the CPU smoke matrix")
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("waivers", help="list known_failures waivers; exit 1 when one expired or no longer fails")
    p.add_argument("--moe-matrix", default="model_matrix.yaml", metavar="PATH")
    p.add_argument("--moe-results-dir", default=DEFAULT_RESULTS_DIR, metavar="DIR",
                   help=f"where the last run's results files are (default: {DEFAULT_RESULTS_DIR})")
    p.set_defaults(func=cmd_waivers)
    p = sub.add_parser("kernels", help="each config's fused-MoE kernel shape and whether a tuned kernel config covers it")
    p.add_argument("--moe-matrix", default="model_matrix.yaml", metavar="PATH")
    p.add_argument("--gpu", default=None, help="GPU to check tuned configs for, e.g. H200 (default: this host's)")
    p.set_defaults(func=cmd_kernels)
    p = sub.add_parser("history", help="the run history database (import old results files)")
    p.add_argument("action", choices=["import"])
    p.add_argument("files", nargs="+", metavar="FILE", help="results JSON, JUnit XML, or a results directory")
    p.add_argument("--moe-history", metavar="URL", help="database URL or SQLite path (default: $PYTEST_MOE_HISTORY, then the user cache dir)")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("report", help="the morning report from the run history")
    p.add_argument("--html", required=True, metavar="OUT", help="write one self-contained HTML file here")
    p.add_argument("--since", metavar="DURATION", help="only nights in this window, e.g. 14d, 36h, 2w (default: all)")
    p.add_argument("--moe-history", metavar="URL", help="database URL or SQLite path (default: $PYTEST_MOE_HISTORY, then the user cache dir)")
    p.add_argument("--moe-matrix", metavar="PATH", help="matrix whose history: block sets the thresholds (default: ./model_matrix.yaml if present)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("merge", help="merge several jobs' results directories into one (seed 001's rules)")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 ok, 1 failure predicted (preflight), 2 bad input: one ``error:`` line, never a traceback."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "takes_pytest_args", False):
        args.pytest_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (MatrixError, ModelInspectionError, ValueError, HistoryError) as exc:
        return _usage_error(str(exc))
    except KeyError as exc:  # an unknown name looked up in a table (a tiny model, a GPU)
        return _usage_error(str(exc.args[0]) if exc.args else repr(exc))
    except OSError as exc:
        return _usage_error(f"cannot read {exc.filename}: {exc.strerror or exc}")


def _usage_error(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2
