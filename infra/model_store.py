"""Load models whose weights live at a URL (local, s3://, hf://, any fsspec protocol).

``pairx_core.models`` does no I/O beyond local files; this module supplies the ``opener`` that
reads a URL into bytes. A Hugging Face repo id (``hf://owner/repo``) resolves to the single
``*.safetensors`` file in the repo (``huggingface_hub`` must be installed: ``pip install
'pairx-pipeline[hf]'``); nothing is downloaded unless you name such a URL.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from pairx_core.errors import ModelLoadError

from .storage import StorageTarget

#: query-string keys whose values are secrets (case-insensitive substrings)
_SECRET_KEYS = ("token", "secret", "password", "passwd", "pwd", "key", "signature", "sig", "credential",
                "auth", "session", "x-amz-")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*)@")
_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;?#\s]+)=(?P<value>[^&;#?\s]*)")
REDACTED = "***"


def redact_model_spec(spec: str) -> str:
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


def url_opener(storage_options: Mapping[str, Any] | None = None):
    """``opener(url) -> bytes`` for :func:`pairx_core.models.load_model`."""

    def opener(url: str) -> bytes:
        if url.startswith("hf://") and not url.endswith((".safetensors", ".pt", ".pth", ".bin")):
            target = StorageTarget.from_url(url, storage_options)
            candidates = [p for p in target.list_files("", suffixes=[".safetensors"])]
            if len(candidates) != 1:
                raise ModelLoadError(url, f"expected one .safetensors file in the repo, found {len(candidates)}")
            url = candidates[0]
        target = StorageTarget.from_url(url, storage_options)
        return target.read_bytes("")

    return opener


def load_model(spec: str, *, storage_options: Mapping[str, Any] | None = None, device=None):
    """``pairx_core.models.load_model`` with URL weights resolved through fsspec."""
    from pairx_core.models import load_model as _load_model

    return _load_model(spec, opener=url_opener(storage_options), device=device)
