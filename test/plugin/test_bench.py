"""The benchmark client against a stand-in stream: token-counted TTFT, and impossible figures refused.

The formulas are SGLang 0.5.23's (``sglang/benchmark/one_batch_server.py``); expectations below are worked
out by hand from raw timestamps, never by inverting the code under test.
"""

import itertools
from types import SimpleNamespace

import pytest
from fakes.stream_server import StreamScript, StubEngine, StubServer

from pytest_moe.checks import CHECKS
from pytest_moe.bench import (BenchmarkError, check_stream, compute_metrics, profile_stages, run_benchmark,
                              stream_completion)
from pytest_moe.configs import BenchSpec, ServerConfig
from pytest_moe.engines import get_engine
from pytest_moe.results import ResultsStore
from pytest_moe.runner import CellRun, RunOptions


def ticking_clock():
    """A clock that advances one second per reading: reading k is chunk k's arrival (start = 0)."""
    counter = itertools.count()
    return lambda: float(next(counter))


def _stream(script: StreamScript, prompts=((1, 2, 3),), max_tokens=4):
    with StubServer(StubEngine(script)) as srv:
        return stream_completion(srv.base_url, "m", [list(p) for p in prompts], max_tokens, clock=ticking_clock())


def test_figures_from_raw_timestamps():
    # Request sent at t=1000.00 s, first token at 1000.25 s, last chunk at 1008.25 s; batch 2, 4096 in, 512 out.
    # By hand: latency 8.25 s, ttft 0.25 s, input 2*4096/0.25 = 32768 tok/s,
    # output 2*512/8.0 = 128 tok/s, ITL 1000*2/128 = 15.625 ms.
    sent, first_token, last_chunk = 1000.00, 1000.25, 1008.25
    result = compute_metrics(2, 4096, 512, latency_s=last_chunk - sent, ttft_s=first_token - sent)
    assert result.latency_s == pytest.approx(8.25)
    assert result.ttft_s == pytest.approx(0.25)
    assert result.input_throughput_tok_per_s == pytest.approx(32768.0)
    assert result.output_throughput_tok_per_s == pytest.approx(128.0)
    assert result.itl_ms == pytest.approx(15.625)


def test_ttft_is_the_first_token_even_when_its_text_is_empty():
    # Three leading chunks carry a token each but no text: chunk 1 (reading 1) is the first token.
    timing = _stream(StreamScript(empty_text_chunks=3), max_tokens=4)
    assert timing.first_token_s == (1.0,)
    assert timing.tokens == (4,)
    # 4 token chunks (readings 1-4), the usage chunk (5), the end (6).
    assert timing.latency_s == 6.0
    check_stream(timing, batch_size=1, output_len=4)


def test_ttft_is_the_first_token_of_the_request_that_started_last():
    # Request 1 streams only after request 0's 3 chunks: its first token is reading 4.
    timing = _stream(StreamScript(late_requests=(1,)), prompts=((1, 2), (3, 4)), max_tokens=3)
    assert timing.first_token_s == (1.0, 4.0)
    assert timing.ttft_s == 4.0
    check_stream(timing, batch_size=2, output_len=3)


def test_the_client_asks_for_token_ids_and_ignore_eos():
    state = StubEngine()
    with StubServer(state) as srv:
        stream_completion(srv.base_url, "m", [[1, 2]], 2)
    assert state.requests[0]["return_token_ids"] is True
    assert state.requests[0]["ignore_eos"] is True


@pytest.mark.parametrize("script, match", [
    (StreamScript(token_delta=-1), "request 0 streamed 3 tokens, expected 4"),
    (StreamScript(token_delta=2), "request 0 streamed 6 tokens, expected 4"),
    (StreamScript(usage_delta=5), "server reports 9 completion tokens, the stream carried 4"),
    (StreamScript(first_chunk_tokens=4), "got 4 of its 4 tokens in its first chunk"),
    (StreamScript(first_chunk_tokens=3), "got 3 of its 4 tokens in its first chunk"),
])
def test_impossible_streams_are_refused(script, match):
    with pytest.raises(BenchmarkError, match=match):
        check_stream(_stream(script, max_tokens=4), batch_size=1, output_len=4)


def test_refusals_say_why_with_figures_from_the_raw_stream():
    # A short stream says what usually causes it.
    with pytest.raises(BenchmarkError, match=r"streamed 3 tokens, expected 4 \(ignore_eos ignored, or chunks lost\)$"):
        check_stream(_stream(StreamScript(token_delta=-1), max_tokens=4), batch_size=1, output_len=4)
    # A first chunk of 2 tokens, then chunks of 1: refused (2 > 1). On the ticking clock the first chunk is
    # reading 1 (TTFT 1 s) and the stream ends at reading 5 (3 token chunks, the usage chunk, the end), so the
    # decode window is 1000 * (5 - 1) = 4000 ms.
    timing = _stream(StreamScript(first_chunk_tokens=2), max_tokens=4)
    assert (timing.ttft_s, timing.latency_s) == (1.0, 5.0)
    with pytest.raises(BenchmarkError, match=r"got 2 of its 4 tokens in its first chunk, more than one chunk of the "
                                             r"stream carries \(1\): the decode window \(4000\.00 ms\) does not hold the "
                                             r"decode \(is the stream buffered\?\)$"):
        check_stream(timing, batch_size=1, output_len=4)


def test_a_server_that_does_not_report_token_ids_is_refused():
    with pytest.raises(BenchmarkError, match="without token_ids"):
        _stream(StreamScript(honours_token_ids=False))


def test_a_missing_request_is_refused():
    timing = _stream(StreamScript(), prompts=((1,),), max_tokens=2)
    with pytest.raises(BenchmarkError, match="tokens for 1 requests, expected 2"):
        check_stream(timing, batch_size=2, output_len=2)


def test_non_200_is_refused():
    with pytest.raises(BenchmarkError, match=r"HTTP 500 from http://127\.0\.0\.1:\d+/v1/completions"):
        _stream(StreamScript(status=500))


def test_error_mid_stream_is_refused():
    with pytest.raises(BenchmarkError, match="server error mid-stream.*engine died mid-stream"):
        _stream(StreamScript(error_after=2))


def test_run_benchmark_records_a_well_formed_stream_and_refuses_a_short_one():
    bench = BenchSpec(batch_size=2, input_len=8, output_len=5, warmup=1)
    with StubServer(StubEngine(StreamScript(empty_text_chunks=2))) as srv:
        result = run_benchmark(srv.base_url, "m", bench)
    assert (result.batch_size, result.input_len, result.output_len) == (2, 8, 5)
    assert 0 < result.ttft_s < result.latency_s
    state = StubEngine(StreamScript(token_delta=-1))
    with StubServer(state) as srv, pytest.raises(BenchmarkError, match="expected 16"):
        run_benchmark(srv.base_url, "m", bench)  # the warm-up (16 tokens) is checked too
    assert [len(r["prompt"]) for r in state.requests] == [2]


def test_batch_size_scales_throughput_and_itl():
    one = compute_metrics(1, 100, 10, latency_s=2.0, ttft_s=1.0)
    four = compute_metrics(4, 100, 10, latency_s=2.0, ttft_s=1.0)
    assert four.input_throughput_tok_per_s == 4 * one.input_throughput_tok_per_s
    assert four.output_throughput_tok_per_s == 40.0
    assert four.itl_ms == pytest.approx(100.0)  # 1000 * bs / output_throughput


@pytest.mark.parametrize("latency, ttft", [(1.0, 1.0), (1.0, 0.0), (1.0, 2.0)])
def test_impossible_timings_are_rejected(latency, ttft):
    with pytest.raises(BenchmarkError, match="impossible timing"):
        compute_metrics(1, 10, 10, latency, ttft)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_profile_traces_land_in_each_stage_directory(engine, tmp_path):
    # The stand-in writes like the engine: into /start_profile's output_dir when sent (SGLang), else into
    # the directory fixed at launch (vLLM's --profiler-config); the runner gives every engine a launch dir.
    launch_dir, out_dir = tmp_path / "raw", tmp_path / "traces"
    state = StubEngine(launch_profile_dir=launch_dir)
    bench = BenchSpec(batch_size=1, input_len=4, output_len=20, warmup=0)
    with StubServer(state) as srv:
        saved = profile_stages(get_engine(engine), srv.base_url, "m", bench, launch_dir=launch_dir, out_dir=out_dir,
                               trace_timeout_s=5)
    assert saved == {"extend": str(out_dir / "extend"), "decode": str(out_dir / "decode")}
    for stage in ("extend", "decode"):
        assert [p.name.endswith(".pt.trace.json.gz") for p in (out_dir / stage).iterdir()] == [True]
    assert [r["max_tokens"] for r in state.requests] == [1, 16]
    assert [r["model"] for r in state.requests] == ["m", "m"]  # the served name the engine knows the model by
    assert not launch_dir.exists() or not any(launch_dir.iterdir())  # vLLM's files were moved out


def test_the_runner_records_an_impossible_stream_as_a_failure_not_a_success(tmp_path):
    cfg = ServerConfig(model="M", name="TP1_auto", model_path="/nonexistent/m", engine="vllm-cpu", tp=1, ep=1,
                       precision="native", quantization=None, moe_backend="auto", args=(), env=(), timeout_s=10,
                       host="127.0.0.1", bench=BenchSpec(batch_size=1, input_len=4, output_len=8, warmup=0),
                       known_failure=None, matrix_path="m.yaml", uses_gpus=False)
    cell = CellRun(cfg, RunOptions(matrix_path="m.yaml", results_dir=tmp_path), lease=None, progress=print)
    store = ResultsStore(tmp_path)
    with StubServer(StubEngine(StreamScript(token_delta=-3))) as srv:
        cell.server = SimpleNamespace(base_url=srv.base_url, served_name="m", profile_dir=None, argv=["stand-in"],
                                      launch_env={}, ready_after_s=None)
        with pytest.raises(BenchmarkError) as info:
            cell.run_check(CHECKS["benchmark"])
    failure = cell.classify_failure(info.value, f"BenchmarkError: {info.value}")
    cell.check_raised(CHECKS["benchmark"], failure)
    cell.record(store, failure)
    successes, failures = store.load()
    assert "M::TP1_auto" not in successes
    entry = failures["M::TP1_auto"]
    assert entry["status"] == "failed" and "request 0 streamed 5 tokens, expected 8" in entry["error_message"]
    assert entry["checks"]["benchmark"] == {"status": "failed"}  # the check that raised keeps its block


class _Lines:
    """An HTTP server that answers every POST with these raw stream lines, then, with ``stall``, goes silent.

    Each line is one HTTP/1.1 chunk, as uvicorn sends a streaming response (vLLM's and SGLang's servers)."""

    def __init__(self, lines: list[bytes], stall: bool = False, pause_after_first: float = 0.0):
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        released = self.released = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, line in enumerate(lines):
                    data = line + b"\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    if i == 0 and pause_after_first:
                        time.sleep(pause_after_first)
                if stall:
                    released.wait(30)
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _chunk(**choice) -> bytes:
    import json

    return b"data: " + json.dumps({"choices": [choice]}).encode()


def test_a_stream_that_goes_silent_fails_after_the_read_timeout():
    import time

    with _Lines([_chunk(index=0, token_ids=[5])], stall=True) as url:
        t0 = time.monotonic()
        with pytest.raises(BenchmarkError, match=r"^request to .* failed: .*[Rr]ead timed out"):
            stream_completion(url, "m", [[1]], 4, timeout_s=0.5)
        assert time.monotonic() - t0 < 10


def test_a_line_that_is_not_json_is_quoted_up_to_200_bytes():
    junk = b"data: " + b"x" * 300
    with _Lines([junk]) as url:
        with pytest.raises(BenchmarkError) as info:
            stream_completion(url, "m", [[1]], 4)
    assert str(info.value) == f"{url}/v1/completions streamed a line that is not JSON: {junk[:200]!r}"


def test_choices_without_an_index_are_request_0_and_a_one_chunk_request_has_no_later_chunk():
    """An engine may leave ``index`` out for a single prompt (the OpenAI schema's default is 0)."""
    with _Lines([_chunk(token_ids=[5, 6, 7]), b"data: [DONE]"]) as url:
        timing = stream_completion(url, "m", [[1]], 3, clock=ticking_clock())
    assert (timing.tokens, timing.first_chunk_tokens, timing.largest_later_chunk) == ((3,), (3,), (0,))
    assert timing.first_token_s == (1.0,) and timing.latency_s == 2.0  # readings: start 0, the chunk 1, the end 2


def test_an_index_left_out_as_the_default_is_request_0_beside_the_others():
    """A front end that writes JSON the proto3 way leaves out fields at their default, so only request 0 has no
    ``index``; its tokens are request 0's, beside request 1's."""
    chunks = [_chunk(token_ids=[5]), _chunk(index=1, token_ids=[6]), _chunk(index=1, token_ids=[7]), b"data: [DONE]"]
    with _Lines(chunks) as url:
        timing = stream_completion(url, "m", [[1], [2]], 2, clock=ticking_clock())
    assert timing.tokens == (1, 2) and timing.first_token_s == (1.0, 2.0)


def test_tokens_are_timed_as_they_arrive_not_when_the_response_is_complete():
    """The first token comes at once and the rest a second later: a client that read the whole body first would
    time every token at the end (a TTFT of a second, the decode window empty)."""
    import time

    with _Lines([_chunk(index=0, token_ids=[5]), _chunk(index=0, token_ids=[6]), b"data: [DONE]"],
                pause_after_first=1.0) as url:
        timing = stream_completion(url, "m", [[1]], 2, clock=time.monotonic)
    assert timing.latency_s >= 1.0
    assert timing.first_token_s[0] < timing.latency_s - 0.5
