"""Credentials out of everything the project writes: flow parameters, tables, logs.

- :func:`hide_model_secrets`: a model spec with credentials becomes its public form
  (``pairx_core.specs.public_spec``); the full spec travels out of band, in the environment
  (:data:`MODEL_SPECS_ENV`, inherited by Dask workers like the storage options), and
  :func:`private_spec` gives it back where the weights are read. Prefect's flow-run parameters,
  the ``runs`` table and the logs only ever see the public form.
- :func:`redact_text`: URL user info, secret-looking query parameters in any percent-encoding,
  AWS access key ids, signature/credential/token fields of HTTP headers, and every credential
  this process knows (storage options, AWS environment, hidden model specs) as literals.
- :func:`install_log_redaction`: every log record made in this process, at every level and by
  every library (botocore's DEBUG lines included), is redacted before any handler sees it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from typing import Iterable

from pairx_core.specs import REDACTED, public_spec, redact_credentials

from .storage import STORAGE_OPTIONS_ENV

__all__ = ["MODEL_SPECS_ENV", "hide_model_secrets", "install_log_redaction", "known_secrets", "private_spec",
           "redact_text"]

#: JSON object {public spec: full spec} of the model specs whose credentials were hidden
MODEL_SPECS_ENV = "PAIRX_MODEL_SPECS"
#: environment variables whose values are credentials
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
                   "HUGGING_FACE_HUB_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN")
_SECRET_OPTION_WORDS = ("key", "secret", "token", "password", "credential", "sas", "auth")

_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA|AGPA|ANPA|AIPA)[A-Z0-9]{12,20}\b")
_HEADER_FIELD = re.compile(
    r"(?i)(?P<name>\b(?:credential|signature|x-amz-security-token|x-amz-signature|x-amz-credential|"
    r"authorization|aws_secret_access_key|aws_session_token|secret_access_key|session_token|password|token|"
    r"secret|api[_-]?key)"
    r"['\"]?\s*[:=]\s*['\"]?)(?P<value>[^'\"\s,;&}]+)")


def _literal_secrets_from_env() -> set[str]:
    found = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    try:
        options = json.loads(os.environ.get(STORAGE_OPTIONS_ENV) or "{}")
    except ValueError:
        options = {}

    def walk(value, secret: bool) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, secret or any(word in str(key).lower() for word in _SECRET_OPTION_WORDS))
        elif isinstance(value, (list, tuple)):
            for inner in value:
                walk(inner, secret)
        elif secret and isinstance(value, str):
            found.add(value)

    walk(options, False)
    for full in _hidden_specs().values():
        found.update(_spec_secrets(full))
    return {value for value in found if value and len(value) >= 4 and value != REDACTED}


_EXTRA: set[str] = set()
_CACHE: dict[str, object] = {"env": None, "secrets": frozenset()}
_CACHE_LOCK = threading.Lock()


def known_secrets() -> frozenset[str]:
    """Credential values this process knows (environment, storage options, hidden model specs)."""
    env_state = (os.environ.get(STORAGE_OPTIONS_ENV), os.environ.get(MODEL_SPECS_ENV),
                 *(os.environ.get(name) for name in SECRET_ENV_VARS), len(_EXTRA))
    with _CACHE_LOCK:
        if _CACHE["env"] != env_state:
            _CACHE["env"] = env_state
            _CACHE["secrets"] = frozenset(_literal_secrets_from_env() | _EXTRA)
        return _CACHE["secrets"]  # type: ignore[return-value]


def add_secrets(values: Iterable[str]) -> None:
    """Also redact these literal values (e.g. credentials read from a file)."""
    _EXTRA.update(v for v in values if v and len(v) >= 4)


def redact_text(text: str) -> str:
    """``text`` without any credential (see the module docstring)."""
    text = redact_credentials(str(text))
    text = _HEADER_FIELD.sub(lambda m: m["name"] + REDACTED, text)
    text = _ACCESS_KEY_ID.sub(REDACTED, text)
    for secret in sorted(known_secrets(), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


# ------------------------------------------------------------------------------ model specs
def _hidden_specs() -> dict[str, str]:
    try:
        specs = json.loads(os.environ.get(MODEL_SPECS_ENV) or "{}")
    except ValueError:
        return {}
    return specs if isinstance(specs, dict) else {}


def _spec_secrets(spec: str) -> set[str]:
    """The parts of ``spec`` that its public form hides (user info, secret parameter values)."""
    public = public_spec(spec)
    if public == spec:
        return set()
    secrets, pattern = set(), re.escape(public).replace(re.escape(REDACTED), "(.+?)")
    match = re.fullmatch(pattern, spec)
    if match:
        secrets.update(group for group in match.groups() if group)
    for piece in list(secrets):  # a user:password pair: each half too
        secrets.update(part for part in re.split(r"[:]", piece) if len(part) >= 4)
    return secrets


def hide_model_secrets(spec: str) -> str:
    """The public form of ``spec``; the full spec is kept in the environment for :func:`private_spec`."""
    public = public_spec(spec)
    if public != spec:
        specs = _hidden_specs()
        specs[public] = spec
        os.environ[MODEL_SPECS_ENV] = json.dumps(specs)
    return public


def private_spec(spec: str) -> str:
    """The full spec behind a public one (unchanged when nothing was hidden)."""
    return _hidden_specs().get(spec, spec)


# ------------------------------------------------------------------------------ logs
_INSTALLED = {"factory": None}


def install_log_redaction() -> None:
    """Redact every log record of this process when it is made (idempotent)."""
    if _INSTALLED["factory"] is not None:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
            clean = redact_text(message)
            if clean != message or record.args:
                record.msg, record.args = clean, ()
            if record.exc_info and not record.exc_text:
                clean_trace = redact_text(logging.Formatter().formatException(record.exc_info))
                record.exc_text = clean_trace
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is left to logging
            pass
        return record

    logging.setLogRecordFactory(factory)
    _INSTALLED["factory"] = factory
