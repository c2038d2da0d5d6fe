"""SGLang adapter: the real ``sglang.launch_server`` parser and SGLang's profiling API."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import requests

from pytest_moe.engines.base import CommandRejected, Engine


class SGLangEngine(Engine):
    def check_command(self, argv: list[str]) -> None:
        """Run SGLang's own ``prepare_server_args`` on the flags after ``-m sglang.launch_server``.

        It works on CPU with ``pip install --no-deps sglang`` (see docs/engines.md); unknown flags and
        invalid choices raise SystemExit 2 with SGLang's message, which we pass on.
        """
        from sglang.srt.server_args import prepare_server_args

        flags = argv[len(self.spec.launch) :]
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                prepare_server_args(flags)
        except SystemExit as exc:
            raise CommandRejected(stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue() else str(exc)) from None

    def environment(self, cfg, profile_dir: Path | None) -> dict[str, str]:
        env = super().environment(cfg, profile_dir)
        if profile_dir is not None:
            env["SGLANG_TORCH_PROFILER_DIR"] = str(profile_dir)
        return env

    def start_profile(self, base_url: str, out_dir: Path, num_steps: int) -> None:
        """SGLang's ``/start_profile``: stops by itself after ``num_steps`` forward steps."""
        body = {"output_dir": str(out_dir), "num_steps": num_steps, "activities": ["CPU", "GPU"]}
        resp = requests.post(base_url + self.spec.profile.start, json=body, timeout=60)
        resp.raise_for_status()

    def trace_dir(self, launch_dir: Path | None, stage_dir: Path) -> Path:
        """SGLang writes into the request's ``output_dir`` (0.5.23
        ``srt/managers/scheduler_components/profiler_manager.py``: ``Path(output_dir)``);
        ``SGLANG_TORCH_PROFILER_DIR`` (the launch directory) is only its fallback when none is sent."""
        return stage_dir

    def stop_profile(self, base_url: str) -> None:
        """SGLang stops after ``num_steps``; an explicit stop then answers an error, which is harmless."""
        with contextlib.suppress(requests.RequestException):
            requests.post(base_url + self.spec.profile.stop, timeout=600)
