"""``model_matrix.yaml`` → validated, fully resolved server configs.

Why validate up front: a typo in the matrix would otherwise surface as a server that fails after a
2000 s model load on an 8-GPU node.  Everything is checked before any test runs, and a bad file stops
pytest with one sentence naming the file, the line, the key and what is allowed.

Why strict and bounded (docs/contract.md): the matrix is input a user — or a pull request — hands us.
Types are strict (``tp: "8"``, ``tp: 8.0`` and ``tp: true`` are errors, not TP8 and TP1), numbers are
finite and bounded, strings carry no control characters, and the file itself is read with a size cap,
a nesting cap and an alias-expansion cap, so no matrix costs more than milliseconds to reject.

Layering, lowest to highest precedence: ``defaults`` < ``rules`` (in file order; the seed's lore such as
"TP8 gets EP2" or "FP8 models get --quantization fp8" is written there once) < the model's own entry <
one of its explicit ``configs``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import types
import typing

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import AfterValidator, BaseModel, Field, ValidationError

from pytest_moe.configs import AccuracySpec, AgreementSpec, BenchSpec, HistorySettings, KernelSpec, KnownFailure, Matrix, ServerConfig, StrictModel, Text, config_name
from pytest_moe.configs import CONTROL_CHARS
from pytest_moe.engines import EngineTableError, engine_names, get_engine
from pytest_moe.errors import ERROR_TYPES
from pytest_moe.tiny import TINY_PREFIX, tiny_model_specs

#: Limits of a matrix file; real matrices are a few KB, a dozen levels deep, with a handful of aliases.
MAX_MATRIX_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 100_000
#: Largest TP size accepted (the biggest NVLink domains are 72 GPUs; 1024 leaves room for multi-node).
MAX_TP = 1024
#: Most nodes one server may span (the largest public MoE deployments use a few dozen).
MAX_NODES = 64
from pytest_moe.history.rows import METRIC_NAMES


class MatrixError(ValueError):
    """The matrix file is malformed; the message is the one sentence shown to the user."""


def _model_name(value: str) -> str:
    """Model names become test ids, results keys (``model::config``) and file names."""
    if CONTROL_CHARS.search(value):
        raise ValueError("control characters (newline, tab, NUL, ...) are not allowed")
    if not value.strip() or "::" in value or "[" in value or "]" in value:
        raise ValueError("a model name must be non-empty and hold no '::', '[' or ']'")
    return value


ModelName = Annotated[str, AfterValidator(_model_name)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


#: Timeouts: positive, finite, at most a week.
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]


class Defaults(StrictModel):
    engine: Text = "sglang"
    timeout_s: Seconds = 2000
    host: Text = "127.0.0.1"
    moe_backends: list[Text] = Field(["auto"], min_length=1)
    args: list[Text] = []
    env: dict[EnvName, Text] = {}
    bench: BenchSpec = BenchSpec()
    kernel: KernelSpec = KernelSpec()
    accuracy: AccuracySpec = AccuracySpec()
    agreement: AgreementSpec = AgreementSpec()


class When(StrictModel):
    """A rule applies when every given field matches (lists mean "any of")."""

    tp: list[int] | None = None
    precision: list[Literal["fp8", "native"]] | None = None
    engine: list[Text] | None = None
    models: list[Text] | None = None


class Then(StrictModel):
    ep: int | None = Field(None, gt=0, le=MAX_TP)
    quantization: Text | None = None
    args: list[Text] = []
    timeout_s: Seconds | None = None


class Rule(StrictModel):
    id: Text
    why: Text = ""
    when: When
    then: Then


class ExplicitConfig(StrictModel):
    """A config spelled out in full, e.g. the TP2+EP2 smoke config that really crashes on CPU."""

    tp: int
    nodes: int | None = Field(None, gt=0, le=MAX_NODES)
    ep: int | None = Field(None, gt=0, le=MAX_TP)
    moe_backend: Text | None = None
    args: list[Text] = []


class ModelEntry(StrictModel):
    path: Text = Field(min_length=1)
    engine: Text | None = None
    precision: Literal["fp8", "native"] = "native"
    quantization: Text | None = None
    tp: list[int] = []
    nodes: int = Field(1, gt=0, le=MAX_NODES)
    moe_backends: list[Text] | None = Field(None, min_length=1)
    args: list[Text] = []
    env: dict[EnvName, Text] = {}
    timeout_s: Seconds | None = None
    bench: BenchSpec | None = None
    accuracy: AccuracySpec | None = None
    agreement: AgreementSpec | None = None
    configs: list[ExplicitConfig] = []
    known_failures: dict[Text, KnownFailure] = {}


class MatrixFile(StrictModel):
    defaults: Defaults = Defaults()
    rules: list[Rule] = []
    history: HistorySettings = HistorySettings()
    models: dict[ModelName, ModelEntry] = Field(min_length=1)


def load_matrix(path: str | Path) -> Matrix:
    """Read, validate and expand a matrix file; raise ``MatrixError`` with one clear sentence."""
    path = Path(path)
    root, data = read_yaml(path, MatrixError)
    try:
        engine_names()
    except EngineTableError as exc:
        raise MatrixError(str(exc)) from None
    locate = _Locator(path, root)
    if not isinstance(data, dict):
        raise MatrixError(f"{path}: the matrix must be a mapping with a 'models' key")
    locate.reject_duplicate_keys(root, ())
    try:
        parsed = MatrixFile.model_validate(data)
    except ValidationError as exc:
        raise MatrixError(_describe_validation_error(exc, locate)) from None
    configs = _expand(parsed, locate)
    _check_file_names(configs, locate)
    _check_history_metrics(parsed.history, locate)
    return Matrix(path=path, configs=configs, kernel=parsed.defaults.kernel, history=parsed.history)


def read_yaml(path: Path, error: type[ValueError]) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the data of a YAML file, within the limits above."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_MATRIX_BYTES + 1)
    except OSError as exc:
        raise error(f"cannot read matrix file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_MATRIX_BYTES:
        raise error(f"{path}: the file is larger than {MAX_MATRIX_BYTES // 1024} KiB, the limit for a matrix")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})") from None
    try:
        # PyYAML checks a str for NUL and other control characters all at once, here (yaml/reader.py Reader.__init__)
        loader = _LimitedLoader(text)
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise error(f"{path}:{line}: not valid YAML (character {exc.character:#06x} is not allowed)") from None
    try:
        root = loader.get_single_node()
        return root, loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise error(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    finally:
        loader.dispose()


class _LimitedLoader(yaml.SafeLoader):
    """``SafeLoader`` that stops deep nesting and alias bombs while composing.

    Why a subclass: PyYAML has no limits of its own.  ``safe_load`` builds no objects it should not, but
    a thousand nested brackets end in a ``RecursionError``, a recursive alias builds a cyclic list that
    later code walks forever, and nine aliases of nine aliases validate as 9**9 nodes.  Counting in
    ``compose_node`` (bottom-up, so each node is measured once) rejects them before anything is built.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        #: ``id(node)`` → (values, depth) with aliases expanded; nodes stay alive in the tree meanwhile.
        self._stats: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_ALIASES} aliases (*name)", mark)
            anchor = self.peek_event().anchor
            if anchor in self.anchors and self._open_anchor(anchor):
                raise yaml.composer.ComposerError(None, None, f"alias *{anchor} refers to a node that contains it", mark)
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._measure(node, mark)
        return node

    def _measure(self, node: yaml.Node, mark: yaml.Mark) -> None:
        """Size and depth of ``node`` as later code will see it, aliases expanded (counted, never built)."""
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        stats = [self._stats.get(id(c), (1, 1)) for c in children]
        size = 1 + sum(s for s, _ in stats)
        depth = 1 + max((d for _, d in stats), default=0)
        if size > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"aliases expand to more than {MAX_YAML_NODES} values", mark)
        if depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"aliases nest deeper than {MAX_YAML_DEPTH} levels", mark)
        self._stats[id(node)] = (size, depth)

    def _open_anchor(self, anchor: str) -> bool:
        """Whether ``anchor``'s node is still being composed (an alias to it would make a cycle)."""
        node = self.anchors[anchor]
        return isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) and node.end_mark is None


def _expand(parsed: MatrixFile, locate: _Locator) -> list[ServerConfig]:
    _check_engine(parsed.defaults.engine, ("defaults", "engine"), locate)
    _check_known_error_types(parsed, locate)
    configs: list[ServerConfig] = []
    seen: set[str] = set()
    for model, entry in parsed.models.items():
        engine = entry.engine or parsed.defaults.engine
        _check_engine(engine, ("models", model, "engine"), locate)
        _check_tiny(entry.path, ("models", model, "path"), locate)
        backends = entry.moe_backends or parsed.defaults.moe_backends
        for i, backend in enumerate(backends):
            where = ("models", model, "moe_backends", i) if entry.moe_backends else ("defaults", "moe_backends", i)
            _check_backend(engine, backend, where, locate)
        cells = [(tp, None, None, [], entry.nodes, ("models", model, "tp", i)) for i, tp in enumerate(entry.tp)]
        cells += [
            (c.tp, c.ep, c.moe_backend, c.args, c.nodes or entry.nodes, ("models", model, "configs", i))
            for i, c in enumerate(entry.configs)
        ]
        if not cells:
            raise locate.error(("models", model), f"model {model!r} lists no 'tp' sizes and no 'configs'")
        names: list[str] = []
        for tp, explicit_ep, explicit_backend, explicit_args, nodes, where in cells:
            _check_tp(tp, where, locate)
            if tp % nodes:
                raise locate.error(where, f"{nodes} nodes do not divide TP {tp} for model {model} (each node runs TP/nodes ranks)")
            for backend in [explicit_backend] if explicit_backend else backends:
                if explicit_backend:
                    _check_backend(engine, backend, (*where, "moe_backend"), locate)
                cfg = _resolve(parsed, model, entry, engine, tp, explicit_ep, backend, explicit_args, nodes, locate, where)
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
    nodes: int,
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
    if ep not in get_engine(engine).spec.ep_style.choices(tp):
        raise locate.error(
            where,
            f"engine {engine} takes expert parallelism as a switch (EP size = TP), so EP must be 1 or {tp}, not {ep}",
        )
    name = config_name(tp, ep, backend, nodes)
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
        bench=_overlaid(parsed.defaults.bench, entry.bench),
        known_failure=entry.known_failures.get(name),
        matrix_path=str(locate.path),
        uses_gpus=get_engine(engine).spec.uses_gpus,
        nodes=nodes,
        accuracy=_overlaid(parsed.defaults.accuracy, entry.accuracy),
        agreement=_overlaid(parsed.defaults.agreement, entry.agreement),
    )


SpecT = TypeVar("SpecT", bound=BaseModel)


def _overlaid(default: SpecT, own: SpecT | None) -> SpecT:
    """A model's ``bench``/``accuracy``/``agreement`` block over the defaults' one, key by key (docs/matrix.md): a
    model that sets only ``bench.batch_sizes`` keeps the defaults' ``input_len``, not the seed's 4096."""
    return default.model_copy(update=own.model_dump(exclude_unset=True)) if own is not None else default


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
    if tp <= 0 or tp > MAX_TP or tp & (tp - 1):
        raise locate.error(where, f"TP {tp} is not a positive power of two up to {MAX_TP} (allowed: 1, 2, 4, 8, ..., {MAX_TP})")


def _check_tiny(path: str, where: tuple, locate: _Locator) -> None:
    """``tiny:NAME`` must name a recipe; found at load time, not when the checkpoint build fails mid-run."""
    if path.startswith(TINY_PREFIX) and path[len(TINY_PREFIX):] not in tiny_model_specs():
        known = ", ".join(TINY_PREFIX + n for n in sorted(tiny_model_specs()))
        raise locate.error(where, f"unknown tiny model {path!r} (allowed: {known})")


def file_stem(config_id: str) -> str:
    """A model or config id as a file name (``Qwen3-235B::TP8_EP2_auto`` → ``Qwen3-235B_TP8_EP2_auto``).

    Why the hash: ids that differ only in characters a file name cannot hold (``/``, a space, ``::``)
    would share one log file and overwrite each other's logs.  A plain id — one ``::`` between names
    made of ``A-Za-z0-9._-`` — keeps the seed's readable name; any other gets a short hash of itself.
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", config_id).strip("._") or "config"
    if not _PLAIN_ID.fullmatch(config_id):
        stem += "-" + hashlib.sha256(config_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return stem


_PLAIN_ID = re.compile(r"[A-Za-z0-9-][A-Za-z0-9._-]*(::[A-Za-z0-9-][A-Za-z0-9._-]*)?")


def _check_file_names(configs: list[ServerConfig], locate: _Locator) -> None:
    """Two ids that still map to one file name (``a_b::c`` vs ``a::b_c``) would share logs and traces."""
    seen: dict[str, str] = {}
    for cfg in configs:
        stem = file_stem(cfg.id).lower()  # case-insensitive file systems (macOS) count too
        if stem in seen:
            raise locate.error(
                ("models", cfg.model),
                f"config {cfg.id} and config {seen[stem]} would share the log file name {file_stem(cfg.id)}.log; rename a model",
            )
        seen[stem] = cfg.id


def _check_engine(engine: str, where: tuple, locate: _Locator) -> None:
    if engine not in engine_names():
        raise locate.error(where, f"unknown engine {engine!r} (allowed: {', '.join(engine_names())})")


def _check_backend(engine: str, backend: str, where: tuple, locate: _Locator) -> None:
    allowed = get_engine(engine).spec.moe_backends
    if backend not in allowed:
        raise locate.error(where, f"unknown MoE backend {backend!r} for engine {engine} (allowed: {', '.join(allowed)})")


def _check_history_metrics(history: HistorySettings, locate: _Locator) -> None:
    """A misspelt metric in ``history:`` would silently keep the default threshold."""
    places = [(("history", "relative", name), name) for name in history.relative]
    places += [(("history", "models", model, name), name) for model, per in history.models.items() for name in per]
    for keys, name in places:
        if name not in METRIC_NAMES:
            raise locate.error(keys, f"unknown metric {name!r} (allowed: {', '.join(METRIC_NAMES)})")


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
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return str(locate.error(loc, f"{_plain(err['msg'])} (got {got})"))


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
