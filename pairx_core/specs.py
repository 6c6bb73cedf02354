"""Model specs as text: what may be shown of them (no torch here: the CLI uses it first)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qsl

from .errors import ConfigError

__all__ = ["BUNDLED_WEIGHTS_DIR", "REDACTED", "ModelSpec", "public_spec", "weights_files"]

#: weights shipped with the package (the demo model)
BUNDLED_WEIGHTS_DIR = Path(__file__).parent / "weights"

#: query-string keys whose values are secrets (case-insensitive substrings)
_SECRET_KEYS = ("token", "secret", "password", "passwd", "pwd", "key", "signature", "sig", "credential",
                "auth", "session", "x-amz-")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*)@")
_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;?#\s]+)=(?P<value>[^&;#?\s]*)")
REDACTED = "***"


def public_spec(spec: str) -> str:
    """The model spec as typed, readable, with credentials removed.

    URL user info (``s3://KEY:SECRET@bucket/...``, ``https://user:token@host/...``) becomes
    ``***@``, and the value of every query parameter whose name looks like a secret (``token``,
    ``secret``, ``password``, ``*key*``, ``signature``/``sig``, ``credential``, ``auth``,
    ``session``, ``X-Amz-*``) becomes ``***``, at any nesting level (a weights URL inside the
    spec's own query string included). Everything else is kept: ``miewid?weights=s3://b/w.safetensors``
    stays as it is.
    """
    text = str(spec)
    text = _USERINFO.sub(lambda m: m["scheme"] + (REDACTED + "@" if m["userinfo"] else "@"), text)

    def param(match: re.Match) -> str:
        name = match["name"].lower()
        if any(word in name for word in _SECRET_KEYS):
            return f"{match['lead']}{match['name']}={REDACTED}"
        return match.group(0)

    return _PARAM.sub(param, text)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind``, ``name`` and options from the query string."""

    kind: str
    name: str
    options: Mapping[str, str]

    @classmethod
    def parse(cls, spec: str) -> "ModelSpec":
        if not spec or not isinstance(spec, str):
            raise ConfigError(f"model spec must be a non-empty string, got {spec!r}")
        base, _, query = spec.partition("?")
        options = dict(parse_qsl(query, keep_blank_values=False))
        if base.startswith("hf://"):
            return cls("miewid", "", {**options, "weights": base})
        kind, _, name = base.partition(":")
        return cls(kind, name, options)


def weights_files(spec: str) -> list[Path] | None:
    """The local files whose bytes decide the weights ``spec`` loads, or ``None`` when that is not
    known from the spec alone (remote weights, ``python:`` factories, random initialisation).

    ``demo``: its bundled config and weights; ``<kind>?weights=PATH`` and ``miewid:PATH``: that
    file. Nothing is read; the files may not exist.
    """
    parsed = ModelSpec.parse(spec)
    if parsed.kind == "demo":
        return [BUNDLED_WEIGHTS_DIR / "demo.json", BUNDLED_WEIGHTS_DIR / "demo.safetensors"]
    source = parsed.options.get("weights") or (parsed.name if parsed.kind == "miewid" else "")
    if parsed.kind == "python" or not source:
        return None
    if source.startswith("file://"):
        source = source[len("file://"):]
    if "://" in source:
        return None
    return [Path(source)]
