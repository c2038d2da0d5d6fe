"""A stand-in OpenAI-style server for lifecycle unit tests (the real engines are tested end to end).

It binds like uvicorn does (SO_REUSEADDR), so a taken port fails with the real
``OSError: [Errno 98] Address already in use``, and it answers ``/health`` and ``/v1/models``.
"""

import argparse
import json
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

    def log_message(self, *a):
        pass


server = ThreadingHTTPServer((args.host, args.port), Handler)
print("Application startup complete.", flush=True)
server.serve_forever()
