"""Credential redaction: model specs, any text, every log record (no I/O, no Prefect)."""

from __future__ import annotations

import json
import logging

import pytest

from infra.redaction import hide_model_secrets, install_log_redaction, private_spec, redact_text
from pairx_core.specs import public_spec


@pytest.mark.parametrize("text, secrets", [
    ("timm:resnet18?weights=http://user:TOKEN123@host/w.safetensors", ["TOKEN123"]),
    ("miewid?weights=https%3A%2F%2Fh%2Fw%3FX-Amz-Signature%3Dsig0123%26X-Amz-Credential%3DAKIAXYZ%252Fday",
     ["sig0123", "AKIAXYZ"]),
    ("miewid?weights=https%253A%252F%252Fh%252Fw%253FX-Amz-Signature%253Dsig0456", ["sig0456"]),
    ("timm:x?weights=https%3A%2F%2Fbob%3Apw987654%40host%2Fw&token=tok555", ["pw987654", "tok555"]),
    ("s3://AKEY:SKEY9876@bucket/w.pt?X%2DAmz%2DSignature=zz999", ["SKEY9876", "zz999"]),
])
def test_public_spec_hides_credentials_in_any_encoding(text, secrets):
    public = public_spec(text)
    assert all(secret not in public for secret in secrets), public
    assert "***" in public


def test_public_spec_keeps_plain_specs():
    for spec in ("demo", "miewid?weights=s3://b/w.safetensors", "timm:efficientnet_b0?size=64", "python:mod:make"):
        assert public_spec(spec) == spec


def test_log_text_access_key_ids_headers_and_known_values(monkeypatch):
    monkeypatch.setenv("PAIRX_STORAGE_OPTIONS", json.dumps({"key": "plainkeyvalue", "secret": "s3cr3t-value",
                                                            "client_kwargs": {"region_name": "eu-west-1"}}))
    text = ("Authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20261204/us-east-1/s3/aws4_request, "
            "Signature=abcdef0123 x-amz-security-token: tok-xyz-1 key plainkeyvalue secret s3cr3t-value eu-west-1")
    clean = redact_text(text)
    for secret in ("AKIAIOSFODNN7EXAMPLE", "abcdef0123", "tok-xyz-1", "plainkeyvalue", "s3cr3t-value"):
        assert secret not in clean, clean
    assert "eu-west-1" in clean  # not a credential


def test_hidden_spec_travels_in_the_environment(monkeypatch):
    monkeypatch.delenv("PAIRX_MODEL_SPECS", raising=False)
    spec = "timm:resnet18?weights=http://u:hidden-pw-42@host/w.safetensors"
    public = hide_model_secrets(spec)
    assert "hidden-pw-42" not in public and private_spec(public) == spec
    assert "hidden-pw-42" not in redact_text(f"loading {spec} and hidden-pw-42 alone")


def test_every_log_record_is_redacted(caplog):
    install_log_redaction()
    # the logger's own level too: CLI tests earlier in the run set "botocore" to WARNING
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="botocore.test"):
        logging.getLogger("botocore.test").debug("GET %s", "https://h/o?X-Amz-Signature=sig778899&a=1")
    assert "sig778899" not in caplog.text and "X-Amz-Signature=***" in caplog.text
