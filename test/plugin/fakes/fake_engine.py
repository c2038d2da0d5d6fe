"""A stand-in OpenAI-style server for lifecycle unit tests (the real engines are tested end to end).

It binds like uvicorn does (SO_REUSEADDR), so a taken port fails with the real
``OSError: [Errno 98] Address already in use``, answers ``/health`` and ``/v1/models``, streams
``/v1/completions`` (so the benchmark runs against it), and with ``--exit-after``/``--say-file`` fails at
start-up printing a chosen error line.
"""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--served-model-name")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int)
parser.add_argument("--tp", default="1")
parser.add_argument("--exit-after", type=float, default=None, help="exit before ready, with --exit-code")
parser.add_argument("--exit-code", type=int, default=0)
parser.add_argument("--ready-after", type=float, default=0.0)
parser.add_argument("--say-file", default=None,
                    help="file holding a line printed before exiting with --exit-after ({port} and {pid} are "
                         "filled in); a file, so the line is not echoed in the command line at the top of the log")
parser.add_argument("--say", default=None, help="a last log line, as an engine echoing its config would print")
# Multi-node, SGLang's form: members past rank 0 serve no HTTP (like SGLang's and vLLM's worker nodes).
parser.add_argument("--nnodes", type=int, default=1)
parser.add_argument("--node-rank", type=int, default=0)
parser.add_argument("--dist-init-addr", default=None)
parser.add_argument("--member-exit-after", type=float, default=None, help="members past rank 0 exit after S seconds")
args, _ = parser.parse_known_args()

print(f"fake engine starting: {' '.join(sys.argv[1:])}", flush=True)
if args.node_rank > 0:
    print(f"fake engine member {args.node_rank} of {args.nnodes} joining {args.dist_init_addr}", flush=True)
    if args.member_exit_after is not None:
        time.sleep(args.member_exit_after)
        print(f"fake engine member {args.node_rank} exiting", flush=True)
        sys.exit(args.exit_code)
    while True:
        time.sleep(3600)
if args.exit_after is not None:
    time.sleep(args.exit_after)
    if args.say_file:
        with open(args.say_file, encoding="utf-8") as fh:
            print(fh.read().strip().format(port=args.port, pid=os.getpid()), flush=True)
    print("fake engine exiting before it was ready", flush=True)
    sys.exit(args.exit_code)
started = time.monotonic()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if time.monotonic() - started < args.ready_after:
            self.send_response(503)
            self.end_headers()
            return
        body = {"data": [{"id": args.served_model_name}]} if self.path == "/v1/models" else {}
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        """A streamed /v1/completions of ``max_tokens`` one-letter tokens per prompt, so the benchmark can run."""
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        n = int(body.get("max_tokens", 1))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        prompt = body.get("prompt")
        batch = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], list) else 1
        for _ in range(n):
            for index in range(batch):  # each chunk carries its token id, as return_token_ids asks
                self.wfile.write(b'data: {"choices": [{"index": %d, "text": "a", "token_ids": [97]}]}\n\n' % index)
        self.wfile.write(b'data: {"choices": [], "usage": {"completion_tokens": %d}}\n\n' % (n * batch))
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer((args.host, args.port), Handler)
print("Application startup complete.", flush=True)
if args.say:
    print(args.say, flush=True)
server.serve_forever()
