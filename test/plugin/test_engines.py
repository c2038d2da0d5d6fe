"""Every command the matrices generate must parse in the engine's *real* argument parser.

SGLang's parser (``prepare_server_args``) and vLLM's (``make_arg_parser``, behind ``vllm serve``) both
run on CPU; scripts/setup.sh installs them (SGLang with --no-deps, see docs/engines.md).
"""

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pytest_moe.engines import CommandRejected, get_engine
from pytest_moe.engines.vllm import cpu_bind_groups
from pytest_moe.matrix import load_matrix

ROOT = Path(__file__).resolve().parents[2]
SEED = load_matrix(ROOT / "model_matrix.yaml")
SMOKE = load_matrix(ROOT / "test/nightly/smoke_matrix.yaml")


def _argv(cfg, engine=None, profile_dir=None):
    engine = engine or get_engine(cfg.engine)
    return engine.command(cfg, "/models/x", host="127.0.0.1", port=30000, served_name="served", profile_dir=profile_dir)


@pytest.mark.parametrize("cfg", SEED.configs, ids=[c.id for c in SEED.configs])
def test_every_seed_matrix_command_parses_in_sglang(cfg):
    get_engine("sglang").check_command(_argv(cfg))


@pytest.mark.parametrize("cfg", SEED.configs, ids=[c.id for c in SEED.configs])
def test_the_seed_matrix_rendered_for_vllm_parses_in_vllm(cfg):
    """The same cells on GPU vLLM: EP becomes --enable-expert-parallel, the backend --moe-backend."""
    vllm_args = tuple(a for a in cfg.args if a not in ("--mem-fraction-static", "0.8"))  # SGLang-only flag
    cfg = replace(cfg, engine="vllm", ep=cfg.tp if cfg.ep > 1 else 1, args=vllm_args)
    argv = _argv(cfg)
    get_engine("vllm").check_command(argv)
    assert ("--enable-expert-parallel" in argv) == (cfg.tp == 8)


@pytest.mark.parametrize("cfg", SMOKE.configs, ids=[c.id for c in SMOKE.configs])
def test_every_smoke_command_parses_in_vllm(cfg, tmp_path):
    get_engine("vllm-cpu").check_command(_argv(cfg, profile_dir=tmp_path))


@pytest.mark.parametrize(
    "engine, bad, message",
    [
        ("sglang", ("--quantization", "fp9"), "argument --quantization: invalid choice: 'fp9'"),
        ("sglang", ("--moe-runner-backend", "warp"), "argument --moe-runner-backend: invalid choice: 'warp'"),
        ("sglang", ("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
        ("vllm-cpu", ("--moe-backend", "warp"), "argument --moe-backend: invalid choice: 'warp'"),
    ],
)
def test_the_check_rejects_what_the_engine_rejects(engine, bad, message):
    cfg = replace(SEED.configs[0], engine=engine, args=bad, quantization=None, moe_backend="auto", ep=1)
    with pytest.raises(CommandRejected, match=message):
        get_engine(engine).check_command(_argv(cfg))


def test_commands_are_argument_lists_with_host_port_and_served_name():
    cfg = SEED.by_id()["Qwen3-235B::TP8_EP2_auto"]
    argv = _argv(cfg)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "30000"
    assert argv[argv.index("--served-model-name") + 1] == "served"
    assert "--moe-runner-backend" not in argv  # auto is SGLang's default: no flag (seed 000)
    # Full flag names: SGLang 0.5.23 declares --tp-size / --ep-size; `--tp` parses only by prefix matching.
    assert argv[argv.index("--tp-size") + 1] == "8" and argv[argv.index("--ep-size") + 1] == "2"
    assert "--tp" not in argv and "--ep" not in argv


def test_vllm_is_launched_through_module_paths():
    """`vllm serve` via its module; the CPU build's `vllm` script and cli.main need the `vllm` distribution's
    metadata, and `vllm.entrypoints.openai.api_server` is deprecated in 0.32 in favour of the launchers."""
    cfg = SMOKE.configs[0]
    assert _argv(cfg)[1:3] == ["-m", "vllm.entrypoints.launchers.api_server.entry"]
    gpu = _argv(replace(cfg, engine="vllm"))
    assert gpu[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", "/models/x"]


@pytest.mark.parametrize("cpus, ranks, expected", [([0, 1], 2, "0|1"), (list(range(8)), 2, "0-3|4-7"), ([0, 1, 2, 3], 4, "0|1|2|3")])
def test_cpu_bind_groups(cpus, ranks, expected):
    assert cpu_bind_groups(cpus, ranks) == expected


def test_cpu_bind_groups_needs_a_core_per_rank():
    with pytest.raises(ValueError, match="needs at least 4 CPU cores, found 2"):
        cpu_bind_groups([0, 1], 4)


@pytest.mark.parametrize(
    "engine, log, phase",
    [
        ("vllm-cpu", "(APIServer pid=1) INFO vLLM API server version 0.32.0", "starting"),
        ("vllm-cpu", "(Worker pid=2) INFO [cpu_model_runner.py:68] Starting to load model /m...", "loading weights"),
        ("vllm", "Starting to load model /m...\nINFO:     Application startup complete.", "HTTP server up, not ready yet"),
        ("sglang", "[2026-11-22 TP0] Load weight begin. avail mem=78.50 GB", "loading weights"),
        ("sglang", "Load weight end.\nINFO:     Uvicorn running on http://127.0.0.1:30000", "HTTP server up, not ready yet"),
    ],
)
def test_progress_phase_comes_from_the_engines_log_patterns(engine, log, phase):
    assert get_engine(engine).phase(log) == phase


# --------------------------------------------------------------------------- adding an engine from outside

PLUGIN_DIR = Path(__file__).resolve().parent
STAND_IN_TABLE = PLUGIN_DIR / "data" / "engines" / "stand_in.yaml"
# Qwen2-57B-A14B has 28 attention heads: TP 4 divides them, TP 8 does not (vLLM's rule tp-must-divide-heads).
HEADS_MODEL = PLUGIN_DIR / "data" / "configs" / "qwen2-57b-a14b.json"
STAND_IN_MATRIX = f"""\
defaults: {{engine: stand-in, moe_backends: [auto]}}
models:
  Heads: {{path: {HEADS_MODEL}, tp: [4, 8]}}
  Other: {{path: {HEADS_MODEL}, engine: sglang, tp: [4]}}
"""


@pytest.fixture
def stand_in(pytester, monkeypatch):
    """A pytester dir whose environment registers the stand-in engine: its table and its adapter's folder."""
    monkeypatch.setenv("PYTEST_MOE_ENGINES", str(STAND_IN_TABLE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(PLUGIN_DIR / "fakes")])))
    pytester.makefile(".yaml", model_matrix=STAND_IN_MATRIX)
    pytester.makepyfile(test_nightly="def test_benchmark(moe_config):\n    print('RAN', moe_config.id)\n")
    return pytester


def test_an_engine_added_from_test_data_goes_through_collection_markers_list_and_preflight(stand_in):
    result = stand_in.runpytest_subprocess("-s", "-rs", "-p", "no:cacheprovider", "-m", "stand_in", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=1)
    assert [line.split("RAN ")[1] for line in result.outlines if "RAN " in line] == ["Heads::TP4_auto"]
    result.stdout.fnmatch_lines(["*Heads::TP8_auto predicted to fail (InvalidArgument) by preflight rule "
                                 "tp-must-divide-heads*28 attention heads*"])

    listed = stand_in.run(sys.executable, "-m", "pytest_moe", "list", "--moe-matrix", "model_matrix.yaml")
    assert listed.ret == 0
    line = next(line for line in listed.outlines if line.startswith("Heads::TP8_auto\t"))
    assert "\ttp8,gpus0,native,stand_in\tgpus=0\t" in line
    assert f"-m stand_in_server --model {HEADS_MODEL} --served-model-name " in line
    assert line.endswith("--tensor-parallel-size 8 --host 127.0.0.1 --port 30000")

    verdict = stand_in.run(sys.executable, "-m", "pytest_moe", "preflight", "--engine", "stand-in",
                           "--model", str(HEADS_MODEL), "--tp", "8")
    assert verdict.ret == 1
    assert '"rule_id": "tp-must-divide-heads"' in verdict.stdout.str()


def test_a_broken_engine_table_names_file_engine_and_key(stand_in, monkeypatch, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(STAND_IN_TABLE.read_text().replace("  ep_style: switch\n", "  ep_style: sideways\n"))
    monkeypatch.setenv("PYTEST_MOE_ENGINES", str(broken))
    result = stand_in.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {broken}: engine stand-in: ep_style: Input should be 'size' or 'switch'*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_the_stand_in_adapter_checks_commands_with_its_own_parser(monkeypatch):
    from pytest_moe.engines import EngineSpec

    monkeypatch.syspath_prepend(str(PLUGIN_DIR / "fakes"))
    from stand_in_adapter import StandInEngine

    spec = EngineSpec.from_yaml("stand-in", yaml.safe_load(STAND_IN_TABLE.read_text())["stand-in"])
    engine = StandInEngine(spec)
    cfg = replace(SMOKE.configs[0], engine="stand-in", args=())
    engine.check_command(_argv(cfg, engine))
    with pytest.raises(CommandRejected, match="unrecognized arguments: --warp"):
        engine.check_command([*_argv(cfg, engine), "--warp"])


@pytest.mark.parametrize("edit, key, message", [
    (lambda raw: raw.pop("readiness_path"), "readiness_path", "Field required"),
    (lambda raw: raw.update(uses_gpus="yes"), "uses_gpus", "Input should be a valid boolean"),
    (lambda raw: raw["flags"].update(tp=8), "flags.tp", "Input should be a valid string"),
    (lambda raw: raw.update(ep_style="flag"), "ep_style", "Input should be 'size' or 'switch'"),
    (lambda raw: raw.update(default_mem_fraction={"checked": {"version": "1", "source": "x"}}),
     "(block)", "exactly one of 'fraction' and 'reserved'"),
])
def test_engine_blocks_are_read_through_a_strict_schema(edit, key, message):
    """engines.yaml used to be raw dicts: a missing key was a KeyError far from the file."""
    from pydantic import ValidationError

    from pytest_moe.engines import EngineSpec

    raw = yaml.safe_load((ROOT / "pytest_moe" / "data" / "engines.yaml").read_text())["vllm"]
    EngineSpec.from_yaml("vllm", raw)
    edit(raw)
    with pytest.raises(ValidationError) as info:
        EngineSpec.from_yaml("vllm", raw)
    err = info.value.errors()[0]
    assert (".".join(map(str, err["loc"])) or "(block)", message in err["msg"]) == (key, True)
