"""``python -m pytest_moe ...``: look at the matrix, a model, a plan or a log without running pytest.

* ``list [--moe-matrix PATH]`` — one line per config: id, markers, GPUs needed, full server command;
* ``classify LOGFILE`` — the error type of a server log, the name alone on one line;
* ``inspect PATH`` — a model's MoE description (from its config.json; never downloads) as JSON;
* ``preflight --model PATH --tp N ...`` — the verdict for one launch as JSON; exit 0 ok, 1 failure predicted;
* ``plan --model PATH --gpu H200 --gpus 8`` — every TP/EP/quantization/backend combination and its verdict;
* ``tiny`` — build the tiny checkpoints of the CPU smoke matrix;
* ``submit --slurm-partition P [pytest selection args]`` — each selected config as one Slurm job (docs/slurm.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pytest_moe.engines import engine_names
from pytest_moe.errors import classify_file
from pytest_moe.matrix import MatrixError, load_matrix
from pytest_moe.models import ModelInspectionError, inspect_model
from pytest_moe.preflight import LaunchPlan, check, gpu_spec, plan_table, render_plan, verdict
from pytest_moe.runner import display_command
from pytest_moe.slurm import SlurmError, SubmitOptions, submit_and_follow
from pytest_moe.tiny import ensure_tiny_model, tiny_model_specs


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
    plan = LaunchPlan(
        engine=args.engine, tp=args.tp, ep=args.ep, quantization=args.quantization, moe_backend=args.backend,
        trust_remote_code=args.trust_remote_code, mem_fraction=args.mem_fraction,
    )
    gpu = gpu_spec(args.gpu, args.gpus or args.tp) if args.gpu else None
    result = verdict(check(inspect_model(args.model), plan, gpu))
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def cmd_plan(args: argparse.Namespace) -> int:
    print(render_plan(plan_table(inspect_model(args.model), gpu_spec(args.gpu, args.gpus), engine=args.engine)))
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    for name in tiny_model_specs():
        print(ensure_tiny_model(name))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    opts = SubmitOptions(
        partition=args.slurm_partition, account=args.slurm_account, run_allowance_s=args.slurm_run_allowance,
        time_minutes=args.slurm_time, poll_s=args.slurm_poll, extra_sbatch=tuple(args.slurm_sbatch_arg),
    )
    try:
        return submit_and_follow(args.pytest_args, opts)
    except SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pytest_moe", description="pytest-moe command line")
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
    p.add_argument("--model", required=True, metavar="PATH")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--quantization", default=None)
    p.add_argument("--backend", default=None, help="MoE backend (default: the engine's auto)")
    p.add_argument("--engine", default="sglang", choices=engine_names())
    p.add_argument("--gpu", default=None, help="GPU name, e.g. H200 (default: skip GPU-dependent rules)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs on the host (default: TP)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--mem-fraction", type=float, default=None)
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("plan", help="which TP/EP/quantization/backend combinations pass preflight")
    p.add_argument("--model", required=True, metavar="PATH")
    p.add_argument("--gpu", required=True, help="GPU name, e.g. H200")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--engine", default="sglang", choices=engine_names())
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("submit", help="run each selected config as one Slurm job; other arguments select as in pytest",
                       usage="python -m pytest_moe submit --slurm-partition P [options] [pytest selection args]")
    p.add_argument("--slurm-partition", required=True, metavar="P")
    p.add_argument("--slurm-account", default=None, metavar="A")
    p.add_argument("--slurm-run-allowance", type=float, default=1800.0, metavar="S",
                   help="seconds added to each config's launch timeout for its time limit (default: 1800)")
    p.add_argument("--slurm-time", type=int, default=None, metavar="MIN", help="time limit in minutes for every job")
    p.add_argument("--slurm-poll", type=float, default=10.0, metavar="S", help="seconds between squeue polls (default: 10)")
    p.add_argument("--slurm-sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch argument, e.g. --slurm-sbatch-arg=--qos=high (repeatable)")
    p.set_defaults(func=cmd_submit, takes_pytest_args=True)

    p = sub.add_parser("tiny", help="build the tiny random-weight MoE checkpoints of the CPU smoke matrix")
    p.set_defaults(func=cmd_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "takes_pytest_args", False):
        args.pytest_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (MatrixError, ModelInspectionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
