"""The module the vllm-cpu adapter launches (``python -m vllm.entrypoints.launchers.api_server.entry``): the stand-in server."""

import runpy

runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
