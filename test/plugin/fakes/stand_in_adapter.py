"""The one adapter file of the stand-in engine (``test/plugin/data/engines/stand_in.yaml``).

Its parser is argparse over the flags its table declares: enough to show that an engine added from
outside the package gets its commands checked like the built-in ones.
"""

import argparse
import contextlib
import io

from pytest_moe.engines.base import CommandRejected, Engine


class StandInEngine(Engine):
    def check_command(self, argv: list[str]) -> None:
        parser = argparse.ArgumentParser(prog="stand-in", exit_on_error=False)
        for flag in self.spec.flags.model_dump().values():
            if flag in (self.spec.flags.ep, self.spec.flags.trust_remote_code):
                parser.add_argument(flag, action="store_true")
            elif flag:
                parser.add_argument(flag)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(argv[len(self.spec.launch):])
        except (SystemExit, argparse.ArgumentError) as exc:
            raise CommandRejected(stderr.getvalue().strip() or str(exc)) from None
