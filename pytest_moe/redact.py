"""The one redaction applied to every text pytest-moe writes: progress lines, failure text, JUnit
properties, results entries, summaries and the server logs we keep.

Why one module: a secret masked in the terminal but not in the JUnit file or the uploaded server log
is still leaked; every writer calls ``redact`` (or ``redact_file``) from here, so a pattern added once
covers them all.

Two layers, the way CI systems mask secrets:

* by *value*: the values of secret-looking environment variables (``HF_TOKEN``, ``*_API_KEY*``,
  ``*_TOKEN*``, ``*_SECRET*``, ``*_PASSWORD*``, ``*_PASS*``) and every secret value we handed to a
  server (``register_secrets``) are replaced wherever they appear — even where the engine prints them
  inside a repr of its own config;
* by *shape*: ``NAME=value`` for those names, ``--api-key``/``--api_key``/``--hf-token`` flags,
  ``Bearer``/``Basic`` credentials and ``scheme://user:password@`` (passwords with ``/`` or ``@`` too).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

MASK = "***"
#: Shorter values are not masked by value: masking "1" or "true" everywhere would garble every line.
MIN_VALUE_LEN = 4

_SECRET_WORD = r"(?:API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASS|CREDENTIALS?|AUTH)"
_SECRET_NAME = re.compile(rf"^(?:HF_TOKEN|HUGGING_FACE_HUB_TOKEN|(?:[A-Z0-9]+_)*{_SECRET_WORD}(?:_[A-Z0-9]+)*)$", re.IGNORECASE)
_ASSIGN = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)=('[^']*'|\"[^\"]*\"|\S+)")
_SECRET_FLAG = re.compile(
    r"(--(?:api[-_]key|hf[-_]token|token|password|secret|auth[-_]token|admin[-_]api[-_]key)(?:=|\s+))('[^']*'|\"[^\"]*\"|\S+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(Bearer)(\s+)[A-Za-z0-9._~+/=-]{4,}", re.IGNORECASE)
_AUTH_HEADER = re.compile(r"(Authorization[\"']?\s*[:=]\s*[\"']?(?:(?:Basic|Bearer|Token)\s+)?)[^\s\"']+", re.IGNORECASE)
#: ``user:password@`` up to the last ``@`` of the URL, so passwords holding ``/`` or ``@`` are covered.
_URL_CREDENTIALS = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^\s:/@]+:[^\s]*@(?=[^\s@]*(?:\s|$))", re.IGNORECASE)

_registered: set[str] = set()


def is_secret_name(name: str) -> bool:
    """Whether an environment variable or option name looks like it holds a secret."""
    return bool(_SECRET_NAME.match(name.lstrip("-").replace("-", "_")))


def secret_values_of(argv: Iterable[str], env: Mapping[str, str]) -> set[str]:
    """The secret values in a server's argument list and environment: what ``register_secrets`` wants."""
    values = {value for name, value in env.items() if is_secret_name(name)}
    args = list(argv)
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and is_secret_name(flag):
            if eq:
                values.add(value)
            elif i + 1 < len(args):
                values.add(args[i + 1])
    return {v for v in values if len(v) >= MIN_VALUE_LEN}


def register_secrets(values: Iterable[str]) -> None:
    """Mask these values from now on in everything this process writes (the way CI masks secrets)."""
    _registered.update(v for v in values if len(v) >= MIN_VALUE_LEN)


def _known_values() -> list[str]:
    from_env = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= MIN_VALUE_LEN}
    return sorted(from_env | _registered, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every known secret value and every secret-shaped substring replaced by ``***``."""
    return _masker()(text)


def _masker() -> Callable[[str], str]:
    """The redaction with today's secret values compiled into one pattern (longest first)."""
    values = _known_values()
    by_value = re.compile("|".join(map(re.escape, values))) if values else None

    def mask(text: str) -> str:
        if by_value is not None:
            text = by_value.sub(MASK, text)
        # Cheap substring tests first: a multi-GB server log is rewritten line by line at teardown.
        lower = text.lower()
        if "=" in text:
            text = _ASSIGN.sub(_mask_assignment, text)
        if "--" in text:
            text = _SECRET_FLAG.sub(rf"\1{MASK}", text)
        if "authorization" in lower:
            text = _AUTH_HEADER.sub(rf"\1{MASK}", text)
        if "bearer" in lower:
            text = _BEARER.sub(rf"\1\2{MASK}", text)
        if "://" in text and "@" in text:
            text = _URL_CREDENTIALS.sub(rf"\1{MASK}@", text)
        return text

    return mask


def _mask_assignment(match: re.Match[str]) -> str:
    return f"{match.group(1)}={MASK}" if is_secret_name(match.group(1)) else match.group(0)


def redact_value(value: Any) -> Any:
    """``redact`` applied to every string inside a JSON-like value (a results entry)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


def redact_file(path: Path) -> None:
    """Rewrite a (possibly huge) server log redacted, line by line, atomically; the mode is kept.

    Why rewrite rather than filter at upload: the nightly workflow uploads the log folder as an artifact,
    and a developer copies logs around; the file on disk must already be clean.
    """
    if not path.is_file():
        return
    mode = path.stat().st_mode & 0o7777
    mask = _masker()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as src, \
                os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as dst:
            for line in src:
                dst.write(mask(line))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
