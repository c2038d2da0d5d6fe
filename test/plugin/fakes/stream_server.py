"""An in-thread stand-in for an engine's OpenAI ``/v1/completions`` stream and its profiling endpoints.

Why a stand-in: the benchmark's figures must be checked against streams we control exactly (leading
chunks whose tokens decode to no text, wrong token counts, errors mid-stream), which no real engine
produces on demand. It follows the engines' wire format: with ``return_token_ids`` each choice carries
the chunk's new ``token_ids`` (vLLM 0.32 ``entrypoints/openai/completion/serving.py``, SGLang 0.5.23
``srt/entrypoints/openai/serving_completions.py``), the last chunk carries ``usage``, errors mid-stream
are ``data: {"error": {...}}``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class StreamScript:
    """How the stand-in streams one request; the defaults are a well-behaved engine."""

    #: Chunks at the start of each request whose token decodes to empty text (random weights, partial UTF-8).
    empty_text_chunks: int = 0
    #: Tokens streamed per request = max_tokens + this (negative: fewer than asked).
    token_delta: int = 0
    #: Tokens the final usage chunk claims beyond what was streamed.
    usage_delta: int = 0
    #: Tokens the first chunk of each request carries (a buffering proxy: all of them).
    first_chunk_tokens: int = 1
    status: int = 200
    #: Send ``{"error": ...}`` after this many chunks.
    error_after: int | None = None
    #: Requests whose first token comes only after every other request's whole stream (a late start).
    late_requests: tuple[int, ...] = ()
    #: False: an older server that ignores ``return_token_ids``.
    honours_token_ids: bool = True


@dataclass
class StubEngine:
    """The server's state: the script, the requests it saw, where it writes profiler traces."""

    script: StreamScript = field(default_factory=StreamScript)
    requests: list[dict] = field(default_factory=list)
    #: SGLang style: ``/start_profile`` writes into the body's ``output_dir``; vLLM style: into this launch dir.
    launch_profile_dir: Path | None = None
    profile_target: Path | None = None


def _chunks(body: dict, script: StreamScript) -> list[dict]:
    prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
    with_ids = bool(body.get("return_token_ids")) and script.honours_token_ids
    per_request: list[list[dict]] = []
    for index in range(len(prompts)):
        n = body["max_tokens"] + script.token_delta
        sizes = [min(script.first_chunk_tokens, n)] + [1] * max(n - script.first_chunk_tokens, 0)
        chunks = []
        for k, size in enumerate(sizes):
            choice = {"index": index, "text": "" if k < script.empty_text_chunks else "x" * size,
                      "finish_reason": "length" if k == len(sizes) - 1 else None}
            if with_ids:
                choice["token_ids"] = [11] * size
            chunks.append({"choices": [choice]})
        per_request.append(chunks)
    stream: list[dict] = []
    # Interleave the requests chunk by chunk, the late ones after everything else.
    on_time = [c for i, c in enumerate(per_request) if i not in script.late_requests]
    for step in range(max((len(c) for c in on_time), default=0)):
        stream += [c[step] for c in on_time if step < len(c)]
    for i in script.late_requests:
        stream += per_request[i]
    streamed = sum(sum(len(ch["choices"][0].get("token_ids", ())) for ch in c) for c in per_request)
    total = (body["max_tokens"] + script.token_delta) * len(prompts)
    stream.append({"choices": [], "usage": {"completion_tokens": (streamed if with_ids else total) + script.usage_delta}})
    return stream


def _handler(state: StubEngine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/start_profile":
                # SGLang 0.5.23 srt/managers/profiler_manager.py: Path(output_dir) when the request names one.
                state.profile_target = Path(body["output_dir"]) if body.get("output_dir") else state.launch_profile_dir
                self._reply(200, {})
                return
            if self.path == "/stop_profile":
                if state.profile_target is None:
                    self._reply(400, {"error": "profiling not started"})
                    return
                state.profile_target.mkdir(parents=True, exist_ok=True)
                n = len(list(state.profile_target.iterdir()))
                (state.profile_target / f"trace-{n}.pt.trace.json.gz").write_bytes(b"trace")
                state.profile_target = None
                self._reply(200, {})
                return
            state.requests.append(body)
            script = state.script
            if script.status != 200:
                self._reply(script.status, {"error": {"message": "stand-in refuses", "code": script.status}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for k, chunk in enumerate(_chunks(body, script)):
                if script.error_after is not None and k == script.error_after:
                    chunk = {"error": {"message": "engine died mid-stream", "code": 500}}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
                if "error" in chunk:
                    break
            else:
                self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

        def log_message(self, *args):
            pass

    return Handler


class StubServer:
    """Context manager: the stand-in on a free localhost port, stopped and joined on exit."""

    def __init__(self, state: StubEngine | None = None):
        self.state = state or StubEngine()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
