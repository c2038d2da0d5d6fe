"""A stand-in for ``python -m vllm.entrypoints.openai.api_server`` that the plugin boots like the real one.

Why a shadow package: a matrix config puts this directory first on the server's ``PYTHONPATH`` (the
matrix's own ``env``), so the whole product path — matrix, selection, launch, readiness, benchmark,
classification, results, report — runs in a second, with nothing patched inside the plugin.

Behaviour is chosen by ``--fake-*`` arguments in the config's ``args`` (vLLM's own flags are ignored):
  --fake-fail NAME        print the engine message NAME stands for (``FAILURES``) and exit with
                          --fake-exit-code before becoming ready; a name, so the command line that
                          the harness writes at the top of the log does not itself carry the message
  --fake-hang             never become ready (for launch timeouts and interrupts)
  --fake-tokens N         report N completion tokens per prompt instead of max_tokens
  --fake-ignore-sigterm   ignore SIGTERM (so does every child)
  --fake-children N       start N children that sleep (the tree teardown must reach)
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--served-model-name")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int)
parser.add_argument("--fake-fail")
parser.add_argument("--fake-exit-code", type=int, default=1)
parser.add_argument("--fake-hang", action="store_true")
parser.add_argument("--fake-tokens", type=int)
parser.add_argument("--fake-ignore-sigterm", action="store_true")
parser.add_argument("--fake-children", type=int, default=0)
args, _ = parser.parse_known_args()
#: Real engine messages (the first line of each error type's pattern example in data/error_patterns.yaml).
FAILURES = {
    "oom": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "nccl": "RuntimeError: NCCL error: unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
}

print(f"fake vllm starting (pid {os.getpid()}): {' '.join(sys.argv[1:])}", flush=True)
if args.fake_ignore_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the children: SIG_IGN survives exec
children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]) for _ in range(args.fake_children)]
print(f"fake vllm children: {' '.join(str(c.pid) for c in children)}", flush=True)
if args.fake_fail is not None:
    print(FAILURES[args.fake_fail], flush=True)
    sys.exit(args.fake_exit_code)
if args.fake_hang:
    print("fake vllm loading forever", flush=True)
    while True:
        time.sleep(3600)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = {"data": [{"id": args.served_model_name}]} if self.path == "/v1/models" else {}
        self._json(body)

    def do_POST(self):  # noqa: N802
        """Streams like uvicorn: HTTP/1.1 chunked, one chunk per event, so the client sees each one as it comes."""
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompts = request["prompt"]
        per_prompt = args.fake_tokens if args.fake_tokens is not None else request["max_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(per_prompt):
            chunk = {"choices": [{"index": i, "text": " tok", "token_ids": [7]} for i in range(len(prompts))]}
            self._chunk(f"data: {json.dumps(chunk)}\n\n")
            time.sleep(0.02)  # a decode time that survives rounding: latency - ttft >= 0.08 s at 5 tokens
        usage = {"choices": [], "usage": {"completion_tokens": per_prompt * len(prompts)}}
        self._chunk(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, text):
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, body):
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer((args.host, args.port), Handler)
print("Application startup complete.", flush=True)
server.serve_forever()
