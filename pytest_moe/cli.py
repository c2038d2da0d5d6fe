"""``python -m pytest_moe ...``: look at the matrix and at logs without running pytest.

Sub-commands: ``list`` (one line per config with its full server command), ``classify LOGFILE``
(the error type of a server log, the name alone on one line) and ``tiny`` (build the CPU smoke models).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pytest_moe.engines import get_engine
from pytest_moe.errors import classify_file
from pytest_moe.matrix import TINY_PREFIX, MatrixError, load_matrix
from pytest_moe.report import shell_line
from pytest_moe.runner import resolve_model_path
from pytest_moe.tiny import ensure_tiny_model, tiny_model_specs

#: Port shown in ``list`` output (SGLang's default); a test run picks a free one.
LIST_PORT = 30000


def cmd_list(args: argparse.Namespace) -> int:
    matrix = load_matrix(args.moe_matrix)
    for cfg in matrix.configs:
        engine = get_engine(cfg.engine)
        argv = engine.command(
            cfg, resolve_model_path(cfg.model_path, build=False), host=cfg.host, port=LIST_PORT,
            served_name=cfg.model_path.removeprefix(TINY_PREFIX), profile_dir=None,
        )
        line = shell_line(argv, engine.environment(cfg, None))
        print(f"{cfg.id}\t{','.join(cfg.markers)}\tgpus={cfg.gpus_needed}\t{line}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    try:
        print(classify_file(args.logfile).error_type)
    except OSError as exc:
        raise SystemExit(f"pytest_moe classify: cannot read {args.logfile}: {exc.strerror or exc}") from None
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    for name in tiny_model_specs():
        print(ensure_tiny_model(name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pytest_moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="print the matrix: id, markers, GPUs needed, server command")
    p_list.add_argument("--moe-matrix", default="model_matrix.yaml", metavar="PATH")
    p_list.set_defaults(func=cmd_list)
    p_cls = sub.add_parser("classify", help="print the error type of a server log")
    p_cls.add_argument("logfile")
    p_cls.set_defaults(func=cmd_classify)
    p_tiny = sub.add_parser("tiny", help="build the tiny random-weight MoE checkpoints of the CPU smoke matrix")
    p_tiny.set_defaults(func=cmd_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MatrixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
