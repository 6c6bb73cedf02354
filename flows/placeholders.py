"""Example values that must never reach a run: the ``REPLACE-ME`` placeholders of the deployment file.

``infra/prefect.yaml`` ships example parameters with ``REPLACE-ME`` in every value a site must
set. A run whose config still holds one (a scheduled run switched on before its parameters were
set, a ``--params`` copied from the file) is refused before anything starts, naming the field.
"""

from __future__ import annotations

import re
from typing import Any

#: marker of an example value in ``infra/prefect.yaml``
PLACEHOLDER = "REPLACE-ME"
_USERINFO = re.compile(r"//[^/@\s]+@")  # credentials in a URL are never echoed


def placeholder_paths(value: Any, path: str = "") -> list[str]:
    """Where ``value`` (a string, or lists / dicts of them) still holds :data:`PLACEHOLDER`.

    ``placeholder_paths({"a": ["x", "s3://REPLACE-ME/"]}, "opts")`` is ``["opts.a[1]"]``.
    """
    if isinstance(value, str):
        return [path or "value"] if PLACEHOLDER in value else []
    if isinstance(value, dict):
        return [p for key, item in value.items()
                for p in placeholder_paths(item, f"{path}.{key}" if path else str(key))]
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in placeholder_paths(item, f"{path}[{i}]")]
    return []


def refuse_placeholder(value: Any) -> Any:
    """``value`` unchanged, or ValueError when it still holds the deployment file's example value."""
    found = placeholder_paths(value)
    if found:
        shown = _USERINFO.sub("//***@", value) if isinstance(value, str) else ", ".join(found)
        raise ValueError(
            f"still the example value from infra/prefect.yaml ({shown!r}): give the deployment its real "
            "parameters (README: Deployments)")
    return value
