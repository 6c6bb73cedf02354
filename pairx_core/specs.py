"""Model specs as text: what may be shown of them (no torch here: the CLI uses it first)."""

from __future__ import annotations

import re

__all__ = ["REDACTED", "public_spec"]

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
