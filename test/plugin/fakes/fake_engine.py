"""A stand-in OpenAI-style server for lifecycle unit tests (the real engines are tested end to end).

It binds like uvicorn does (SO_REUSEADDR), so a taken port fails with the real
``OSError: [Errno 98] Address already in use``, answers ``/health`` and ``/v1/models``, streams
``/v1/completions`` (so the benchmark runs against it), and with ``--exit-after``/``--say-file`` fails at
start-up printing a chosen error line.

``/v1/completions`` answers like a known model, so the checks' verdicts are decided by the test, not by
random weights: streamed batches for the benchmark, "a+b=" questions answered right (or off by one with
``--arithmetic wrong``), and greedy token ids that are a fixed function of the prompt — except where
``--perturb-prompt P --perturb-at K`` plants a divergence (a stand-in for perturbed expert weights).
"""

import argparse
import hashlib
import json
import os
import re
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
parser.add_argument("--arithmetic", choices=["right", "wrong"], default="right")
parser.add_argument("--perturb-prompt", type=int, default=None)
parser.add_argument("--perturb-at", type=int, default=0)
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

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions":
            return self._json({})
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        n = body.get("max_tokens", 16)
        if body.get("stream"):
            return self._stream(len(prompts), n)
        choices = []
        for index, prompt in enumerate(prompts):
            ids = greedy_ids(prompt, n, index)
            choices.append({"index": index, "text": answer(prompt) if isinstance(prompt, str) else "",
                            "token_ids": ids if body.get("return_token_ids") else None})
        self._json({"choices": choices})

    def _json(self, body):
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _stream(self, batch, n):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(n):
            time.sleep(0.001)
            # each chunk carries its token id, as return_token_ids asks
            chunk = {"choices": [{"index": i, "text": "x", "token_ids": [120]} for i in range(batch)]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"completion_tokens": batch * n}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *a):
        pass


def answer(prompt):
    """The last "a+b=" question of a few-shot prompt, answered (off by one with --arithmetic wrong)."""
    questions = re.findall(r"Question: (\d+)\+(\d+)=", prompt)
    if not questions:
        return " no idea"
    a, b = map(int, questions[-1])
    return f" #### {a + b + (args.arithmetic == 'wrong')}"


def greedy_ids(prompt, n, index):
    seed = hashlib.sha256(str(prompt).encode()).digest()
    ids = [seed[i % len(seed)] + i for i in range(n)]
    if index == args.perturb_prompt and args.perturb_at < n:
        ids[args.perturb_at] += 1000
    return ids


server = ThreadingHTTPServer((args.host, args.port), Handler)
print("Application startup complete.", flush=True)
if args.say:
    print(args.say, flush=True)
server.serve_forever()
