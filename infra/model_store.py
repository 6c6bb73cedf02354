"""Load models whose weights live at a URL (local, s3://, hf://, any fsspec protocol).

``pairx_core.models`` does no I/O beyond local files; this module supplies the ``opener`` that
reads a URL into bytes. A Hugging Face repo id (``hf://owner/repo``) resolves to the single
``*.safetensors`` file in the repo (``huggingface_hub`` must be installed: ``pip install
'pairx-pipeline[hf]'``); nothing is downloaded unless you name such a URL.
"""

from __future__ import annotations

from typing import Any, Mapping

from pairx_core.errors import ModelLoadError
from pairx_core.specs import public_spec as redact_model_spec  # noqa: F401 - the name infra callers use

from .storage import StorageTarget

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

    from .redaction import private_spec

    return _load_model(private_spec(spec), opener=url_opener(storage_options), device=device)
