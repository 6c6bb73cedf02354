"""Model specs as text: what may be shown of them (no torch here: the CLI uses it first)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qsl, unquote

from .errors import ConfigError

__all__ = ["BUNDLED_WEIGHTS_DIR", "REDACTED", "ModelSpec", "demo_default_layer", "public_spec", "redact_credentials",
           "weights_files"]

#: weights shipped with the package (the demo model)
BUNDLED_WEIGHTS_DIR = Path(__file__).parent / "weights"

REDACTED = "***"

#: query-string keys whose values are secrets (case-insensitive substrings)
_SECRET_KEYS = ("token", "secret", "password", "passwd", "pwd", "key", "signature", "sig", "credential",
                "auth", "session", "x-amz-")
#: a percent sign, itself percent-encoded any number of times (``%``, ``%25``, ``%2525``)
_PCT = r"%(?:25)*"
_SEP = rf"(?:[?&;]|{_PCT}(?:3[Ff]|26|3[Bb]))"
_EQ = rf"(?:=|{_PCT}3[Dd])"
_VALUE_END = rf"(?:[&;#?\s\"'<>,)\]]|{_PCT}(?:26|3[Bb]|23|3[Ff]|22|27))"
_USERINFO = re.compile(
    rf"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*(?:://|{_PCT}3[Aa]{_PCT}2[Ff]{_PCT}2[Ff]))"
    rf"(?P<userinfo>(?:(?!{_PCT}40|{_PCT}2[Ff]|{_PCT}3[Ff])[^/?#@\s\"'<>])*)(?P<at>@|{_PCT}40)")
_PARAM = re.compile(rf"(?P<lead>{_SEP})(?P<name>(?:(?!{_EQ}|{_SEP})[^=&;?#\s\"'<>])+)(?P<eq>{_EQ})"
                    rf"(?P<value>(?:(?!{_VALUE_END}).)*)")


def _decoded(text: str) -> str:
    """``text`` with percent-encoding undone, however many times it was applied."""
    for _ in range(4):
        plain = unquote(text)
        if plain == text:
            break
        text = plain
    return text


def redact_credentials(text: str) -> str:
    """``text`` with URL user info and the values of secret-looking query parameters replaced by
    ``***``, in any percent-encoding (a signed URL inside another URL's query string included)."""
    text = _USERINFO.sub(lambda m: m["scheme"] + (REDACTED if m["userinfo"] else "") + m["at"], str(text))

    def param(match: re.Match) -> str:
        name = _decoded(match["name"]).lower()
        if match["value"] and any(word in name for word in _SECRET_KEYS):
            return f"{match['lead']}{match['name']}{match['eq']}{REDACTED}"
        return match.group(0)

    return _PARAM.sub(param, text)


def public_spec(spec: str) -> str:
    """The model spec as typed, readable, with credentials removed.

    URL user info (``s3://KEY:SECRET@bucket/...``, ``https://user:token@host/...``) becomes
    ``***@``, and the value of every query parameter whose name looks like a secret (``token``,
    ``secret``, ``password``, ``*key*``, ``signature``/``sig``, ``credential``, ``auth``,
    ``session``, ``X-Amz-*``) becomes ``***``, at any nesting level and in any percent-encoding
    (a signed weights URL inside the spec's own query string included). Everything else is kept: ``miewid?weights=s3://b/w.safetensors``
    stays as it is.
    """
    return redact_credentials(str(spec))


def demo_default_layer() -> str:
    """The layer the demo model was trained and checked for (from its bundled ``demo.json``)."""
    import json

    config_path = BUNDLED_WEIGHTS_DIR / "demo.json"
    if not config_path.exists():
        return "backbone.blocks.2"
    return str(json.loads(config_path.read_text()).get("layer", "backbone.blocks.2"))


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
