"""``model_matrix.yaml`` → validated, fully resolved server configs.

Why validate up front: a typo in the matrix would otherwise surface as a server that fails after a
2000 s model load on an 8-GPU node.  Everything is checked before any test runs, and a bad file stops
pytest with one sentence naming the file, the line, the key and what is allowed.

Layering, lowest to highest precedence: ``defaults`` < ``rules`` (in file order; the seed's lore such as
"TP8 gets EP2" or "FP8 models get --quantization fp8" is written there once) < the model's own entry <
one of its explicit ``configs``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pytest_moe.engines import engine_names, get_engine
from pytest_moe.errors import ERROR_TYPES


class MatrixError(ValueError):
    """The matrix file is malformed; the message is the one sentence shown to the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BenchSpec(_Strict):
    """The benchmark shape: batch 1, 4096 in, 512 out in the seeds; ``batch_sizes`` sweeps (SGLang: 1, 8, 16, 64)."""

    batch_size: int = Field(1, gt=0)
    batch_sizes: list[int] | None = Field(None, min_length=1)
    input_len: int = Field(4096, gt=0)
    output_len: int = Field(512, gt=0)
    warmup: int = Field(1, ge=0)

    @property
    def sweep(self) -> list[int]:
        """Batch sizes measured, in order; the first one's row is the entry's flat (seed) fields."""
        return list(self.batch_sizes or [self.batch_size])

    def at(self, batch_size: int) -> BenchSpec:
        """This shape at one batch size (what ``bench.run_benchmark`` measures)."""
        return self.model_copy(update={"batch_size": batch_size, "batch_sizes": None})


class AccuracySpec(_Strict):
    """gsm8k-style few-shot check; ``floor`` is per model (a floor copied between models is sglang PR 38725's bug)."""

    floor: float | None = Field(None, ge=0, le=1)
    n: int = Field(50, gt=0)
    shots: int = Field(5, ge=0)
    dataset: str | None = None
    max_tokens: int = Field(64, gt=0)
    confidence: float = Field(0.99, gt=0.5, lt=1)
    parallel: int = Field(8, gt=0)


class AgreementSpec(_Strict):
    """Seed 004's oracle: every config of a model must answer like its ``reference`` config."""

    reference: str | None = None
    threshold: float = Field(1.0, ge=0, le=1)
    max_tokens: int = Field(32, gt=0)


class KnownFailure(_Strict):
    """A config expected to fail this way: it xfails on that error type and fails on any other outcome."""

    error_type: str
    reason: str


class Defaults(_Strict):
    engine: str = "sglang"
    timeout_s: float = Field(2000, gt=0)
    host: str = "127.0.0.1"
    moe_backends: list[str] = ["auto"]
    args: list[str] = []
    env: dict[str, str] = {}
    bench: BenchSpec = BenchSpec()
    accuracy: AccuracySpec = AccuracySpec()
    agreement: AgreementSpec = AgreementSpec()


class When(_Strict):
    """A rule applies when every given field matches (lists mean "any of")."""

    tp: list[int] | None = None
    precision: list[Literal["fp8", "native"]] | None = None
    engine: list[str] | None = None
    models: list[str] | None = None


class Then(_Strict):
    ep: int | None = Field(None, gt=0)
    quantization: str | None = None
    args: list[str] = []
    timeout_s: float | None = Field(None, gt=0)


class Rule(_Strict):
    id: str
    why: str = ""
    when: When
    then: Then


class ExplicitConfig(_Strict):
    """A config spelled out in full, e.g. the TP2+EP2 smoke config that really crashes on CPU."""

    tp: int
    ep: int | None = Field(None, gt=0)
    moe_backend: str | None = None
    args: list[str] = []


class ModelEntry(_Strict):
    path: str
    engine: str | None = None
    precision: Literal["fp8", "native"] = "native"
    quantization: str | None = None
    tp: list[int] = []
    moe_backends: list[str] | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    timeout_s: float | None = Field(None, gt=0)
    bench: BenchSpec | None = None
    accuracy: AccuracySpec | None = None
    agreement: AgreementSpec | None = None
    configs: list[ExplicitConfig] = []
    known_failures: dict[str, KnownFailure] = {}


class MatrixFile(_Strict):
    defaults: Defaults = Defaults()
    rules: list[Rule] = []
    models: dict[str, ModelEntry]


@dataclass(frozen=True)
class ServerConfig:
    """One cell of the matrix: everything needed to boot, benchmark and record it."""

    model: str
    name: str
    model_path: str
    engine: str
    tp: int
    ep: int
    precision: str
    quantization: str | None
    moe_backend: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    timeout_s: float
    host: str
    bench: BenchSpec
    known_failure: KnownFailure | None
    matrix_path: str
    accuracy: AccuracySpec = dataclasses.field(default_factory=AccuracySpec)
    agreement: AgreementSpec = dataclasses.field(default_factory=AgreementSpec)

    @property
    def is_reference(self) -> bool:
        """This config's greedy outputs are what the model's other configs are compared with."""
        return self.agreement.reference == self.name

    @property
    def id(self) -> str:
        """``model::config``, the key of the results files and the test id."""
        return f"{self.model}::{self.name}"

    @property
    def gpus_needed(self) -> int:
        """GPUs this config occupies; CPU engines need none."""
        return self.tp if get_engine(self.engine).spec.uses_gpus else 0

    @property
    def markers(self) -> list[str]:
        """Marker names: ``tpN``, ``gpusN``, the precision and the engine (``vllm-cpu`` → ``vllm_cpu``)."""
        return [f"tp{self.tp}", f"gpus{self.gpus_needed}", self.precision, self.engine.replace("-", "_")]


@dataclass(frozen=True)
class Matrix:
    path: Path
    configs: list[ServerConfig]

    def by_id(self) -> dict[str, ServerConfig]:
        return {cfg.id: cfg for cfg in self.configs}


def config_name(tp: int, ep: int, backend: str) -> str:
    """The seeds' config naming: ``TP4_auto``, ``TP8_EP2_auto``."""
    return f"TP{tp}" + (f"_EP{ep}" if ep > 1 else "") + f"_{backend}"


def load_matrix(path: str | Path) -> Matrix:
    """Read, validate and expand a matrix file; raise ``MatrixError`` with one clear sentence."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MatrixError(f"cannot read matrix file {path}: {exc.strerror or exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise MatrixError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    locate = _Locator(path, root)
    if not isinstance(data, dict):
        raise MatrixError(f"{path}: the matrix must be a mapping with a 'models' key")
    locate.reject_duplicate_keys(root, ())
    try:
        parsed = MatrixFile.model_validate(data)
    except ValidationError as exc:
        raise MatrixError(_describe_validation_error(exc, locate)) from None
    return Matrix(path=path, configs=_expand(parsed, locate))


def _expand(parsed: MatrixFile, locate: _Locator) -> list[ServerConfig]:
    _check_engine(parsed.defaults.engine, ("defaults", "engine"), locate)
    _check_known_error_types(parsed, locate)
    configs: list[ServerConfig] = []
    seen: set[str] = set()
    for model, entry in parsed.models.items():
        engine = entry.engine or parsed.defaults.engine
        _check_engine(engine, ("models", model, "engine"), locate)
        backends = entry.moe_backends or parsed.defaults.moe_backends
        for i, backend in enumerate(backends):
            where = ("models", model, "moe_backends", i) if entry.moe_backends else ("defaults", "moe_backends", i)
            _check_backend(engine, backend, where, locate)
        cells = [(tp, None, None, [], ("models", model, "tp", i)) for i, tp in enumerate(entry.tp)]
        cells += [
            (c.tp, c.ep, c.moe_backend, c.args, ("models", model, "configs", i)) for i, c in enumerate(entry.configs)
        ]
        if not cells:
            raise locate.error(("models", model), f"model {model!r} lists no 'tp' sizes and no 'configs'")
        names: list[str] = []
        for tp, explicit_ep, explicit_backend, explicit_args, where in cells:
            _check_tp(tp, where, locate)
            for backend in [explicit_backend] if explicit_backend else backends:
                if explicit_backend:
                    _check_backend(engine, backend, (*where, "moe_backend"), locate)
                cfg = _resolve(parsed, model, entry, engine, tp, explicit_ep, backend, explicit_args, locate, where)
                if cfg.id in seen:
                    raise locate.error(where, f"config {cfg.id} is defined twice")
                seen.add(cfg.id)
                names.append(cfg.name)
                configs.append(cfg)
        _mark_reference(configs, model, entry, locate)
        for name in entry.known_failures:
            if name not in names:
                raise locate.error(
                    ("models", model, "known_failures", name),
                    f"known_failures names {name!r}, which is not a config of {model} (configs: {', '.join(names)})",
                )
    return configs


def _resolve(
    parsed: MatrixFile,
    model: str,
    entry: ModelEntry,
    engine: str,
    tp: int,
    explicit_ep: int | None,
    backend: str,
    explicit_args: list[str],
    locate: _Locator,
    where: tuple,
) -> ServerConfig:
    """Apply defaults, then matching rules in order, then the model entry, then the explicit config."""
    ep, quantization = 1, None
    args = list(parsed.defaults.args)
    timeout = parsed.defaults.timeout_s
    for rule in parsed.rules:
        if _matches(rule.when, model=model, tp=tp, precision=entry.precision, engine=engine):
            ep = rule.then.ep or ep
            quantization = rule.then.quantization or quantization
            args += rule.then.args
            timeout = rule.then.timeout_s or timeout
    ep = explicit_ep or ep
    quantization = entry.quantization or quantization
    if tp % ep:
        raise locate.error(where, f"EP {ep} does not divide TP {tp} for model {model} (EP must divide TP)")
    if get_engine(engine).spec.ep_style == "flag" and ep not in (1, tp):
        raise locate.error(
            where,
            f"engine {engine} takes expert parallelism as a switch (EP size = TP), so EP must be 1 or {tp}, not {ep}",
        )
    name = config_name(tp, ep, backend)
    return ServerConfig(
        model=model,
        name=name,
        model_path=entry.path,
        engine=engine,
        tp=tp,
        ep=ep,
        precision=entry.precision,
        quantization=quantization,
        moe_backend=backend,
        args=tuple(args + entry.args + explicit_args),
        env=tuple(sorted({**parsed.defaults.env, **entry.env}.items())),
        timeout_s=entry.timeout_s or timeout,
        host=parsed.defaults.host,
        bench=entry.bench or parsed.defaults.bench,
        known_failure=entry.known_failures.get(name),
        matrix_path=str(locate.path),
        accuracy=parsed.defaults.accuracy.model_copy(update=entry.accuracy.model_dump(exclude_unset=True))
        if entry.accuracy else parsed.defaults.accuracy,
        agreement=parsed.defaults.agreement.model_copy(update=entry.agreement.model_dump(exclude_unset=True))
        if entry.agreement else parsed.defaults.agreement,
    )


def _mark_reference(configs: list[ServerConfig], model: str, entry: ModelEntry, locate: _Locator) -> None:
    """The declared ``agreement.reference``, else the smallest-TP ``auto`` config (the fewest moving parts)."""
    own = [i for i, cfg in enumerate(configs) if cfg.model == model]
    declared = own and configs[own[0]].agreement.reference
    if declared:
        match = [i for i in own if configs[i].name == declared]
        if not match:
            names = ", ".join(configs[i].name for i in own)
            raise locate.error(("models", model, "agreement", "reference"),
                               f"reference {declared!r} is not a config of {model} (configs: {names})")
        chosen = match[0]
    else:
        autos = [i for i in own if configs[i].moe_backend == "auto"] or own
        chosen = min(autos, key=lambda i: (configs[i].tp, configs[i].ep))
    for i in own:
        configs[i] = dataclasses.replace(configs[i], agreement=configs[i].agreement.model_copy(
            update={"reference": configs[chosen].name}))


def _matches(when: When, **values: Any) -> bool:
    return all(
        allowed is None or values[field] in allowed
        for field, allowed in (("tp", when.tp), ("precision", when.precision), ("engine", when.engine), ("model", when.models))
    )


def _check_tp(tp: int, where: tuple, locate: _Locator) -> None:
    if tp <= 0 or tp & (tp - 1):
        raise locate.error(where, f"TP {tp} is not a positive power of two (allowed: 1, 2, 4, 8, 16, ...)")


def _check_engine(engine: str, where: tuple, locate: _Locator) -> None:
    if engine not in engine_names():
        raise locate.error(where, f"unknown engine {engine!r} (allowed: {', '.join(engine_names())})")


def _check_backend(engine: str, backend: str, where: tuple, locate: _Locator) -> None:
    allowed = get_engine(engine).spec.moe_backends
    if backend not in allowed:
        raise locate.error(where, f"unknown MoE backend {backend!r} for engine {engine} (allowed: {', '.join(allowed)})")


def _check_known_error_types(parsed: MatrixFile, locate: _Locator) -> None:
    for model, entry in parsed.models.items():
        for name, known in entry.known_failures.items():
            if known.error_type not in ERROR_TYPES:
                raise locate.error(
                    ("models", model, "known_failures", name, "error_type"),
                    f"unknown error_type {known.error_type!r} (allowed: {', '.join(ERROR_TYPES)})",
                )


class _Locator:
    """Maps a key path inside the YAML document to ``file:line`` for error messages."""

    def __init__(self, path: Path, root: yaml.Node | None):
        self.path = path
        self.root = root

    def line(self, keys: tuple) -> int | None:
        node, line = self.root, None
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
                if match is None:
                    break
                line = match[0].start_mark.line + 1
                node = match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def error(self, keys: tuple, message: str) -> MatrixError:
        line = self.line(keys)
        where = f"{self.path}:{line}" if line else str(self.path)
        return MatrixError(f"{where}: {_dotted(keys)}: {message}")

    def reject_duplicate_keys(self, node: yaml.Node | None, keys: tuple) -> None:
        """PyYAML silently keeps the last of two equal keys; in a matrix that hides a config."""
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                if k.value in seen:
                    raise MatrixError(f"{self.path}:{k.start_mark.line + 1}: {_dotted((*keys, k.value))}: key appears twice")
                seen.add(k.value)
                self.reject_duplicate_keys(v, (*keys, k.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self.reject_duplicate_keys(v, (*keys, i))


def _dotted(keys: tuple) -> str:
    out = ""
    for key in keys:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out or "(top level)"


def _describe_validation_error(exc: ValidationError, locate: _Locator) -> str:
    """First pydantic error as one sentence, with the allowed keys for an unknown one."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        return str(locate.error(loc, f"unknown key {loc[-1]!r} (allowed: {', '.join(allowed)})"))
    if err["type"] == "missing":
        return str(locate.error(loc, "required key is missing"))
    return str(locate.error(loc, f"{_plain(err['msg'])} (got {err.get('input')!r})"))


def _plain(msg: str) -> str:
    return re.sub(r"^Value error, ", "", msg).rstrip(".")


def _fields_at(loc: tuple) -> list[str]:
    """Field names of the schema class reached by walking ``loc`` from ``MatrixFile``."""
    tp: Any = MatrixFile
    for key in loc:
        tp = _unwrap_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            tp = tp.model_fields[key].annotation
        else:
            tp = typing.get_args(tp)[-1]  # dict[str, X] or list[X]: the element type
    tp = _unwrap_optional(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp
