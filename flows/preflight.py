"""Checks that run before anything expensive starts: inputs, model spec, layers.

:func:`check_inputs` only reads listings and small files (about a second; no torch, no Prefect):
the CLI calls it before it starts a Prefect server, a cluster or a model, so a missing share or a
broken pairs table fails in seconds with one line. :func:`resolve_model` builds the model on the
CPU of the calling process (once per process, see ``infra.model_runtime``), picks the family's default
layer when none is given and checks the layer names; the CLI calls it before the run starts, and
every work flow calls it first, so deployments get the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infra.inputs import InputError, list_gallery, list_uploads, read_pairs
from infra.model_store import redact_model_spec
from infra.storage import StorageTarget
from pairx_core.errors import ConfigError


class RandomWeightsRefused(ConfigError):
    """The model spec would run with random weights and that was not allowed explicitly."""

    def __init__(self, spec: str, hint: str):
        self.spec = spec
        self.hint = hint
        super().__init__(f"{hint}. To run it anyway (tests, benchmarks), pass --allow-random-weights "
                         "(config: allow_random_weights: true).")


@dataclass(frozen=True)
class RunPlan:
    """What a run will work on, known before it starts (printed by the CLI as its first line)."""

    flow: str
    counts: dict[str, int] = field(default_factory=dict)

    def describe(self, config) -> str:
        counts = ", ".join(f"{n} {what}" for what, n in self.counts.items())
        layers = ",".join(config.layers) if config.layers else "family default"
        return (f"{self.flow}: {counts}; model {redact_model_spec(config.model)}, layer {layers}; "
                f"output {config.out}")


@dataclass(frozen=True)
class ModelPlan:
    """The model of a run as resolved in this process."""

    model_id: str
    layers: tuple[str, ...]
    facts: dict[str, Any]


def check_output(out: str, storage_options=None) -> None:
    """An object-store output needs an existing bucket; a local output needs a folder-able path."""
    target = StorageTarget.from_url(out, storage_options)
    fs = target.filesystem()
    path = fs._strip_protocol(target.root)
    if target.is_object_store:
        bucket = path.split("/", 1)[0]
        if not fs.exists(bucket):
            raise InputError(target.root, f"the bucket {bucket!r} does not exist (or these credentials cannot see it)")
    elif target.is_local:
        import os

        parent = path
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise InputError(target.root, f"{parent} is a file, so the output folder cannot be created")
        if parent and not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(target.root, f"the output folder is read-only for this user ({parent} is not writable)")


def check_inputs(flow: str, config) -> RunPlan:
    """Check a flow's inputs without running anything; return what the run will work on.

    Raises:
        InputError: a missing folder, an empty gallery, a missing, empty, binary or malformed pairs
            table (file and problem named), a missing bucket.
    """
    so = config.storage_options or None
    check_output(config.out, so)
    if flow == "nightly":
        uploads = list_uploads(config.uploads, so)
        gallery = list_gallery(config.gallery, so)
        if not gallery:
            raise InputError(config.gallery, "the gallery has no images")
        return RunPlan(flow, {"uploads": len(uploads), "gallery images": len(gallery)})
    if flow == "explain_pairs":
        return RunPlan(flow, {"pairs": len(read_pairs(config.pairs, config.image_root, so))})
    if flow == "reprocess":
        if not StorageTarget.from_url(config.out, so).exists("tables/pairs"):
            raise InputError(config.out, "no pairs table under this output: nothing to reprocess")
        return RunPlan(flow, {})
    raise ConfigError(f"unknown flow {flow!r}")


def check_model_spec(spec: str, allow_random_weights: bool) -> None:
    """Known model kind, and weights unless random weights are allowed (parses only: no build)."""
    from pairx_core.errors import RandomWeightsError
    from pairx_core.models import ensure_weights

    try:
        ensure_weights(spec, allow_random_weights=allow_random_weights)
    except RandomWeightsError as error:
        raise RandomWeightsRefused(error.spec, error.hint) from None


def resolve_model(config) -> ModelPlan:
    """Build the config's model on the CPU (cached), resolve and check its layers.

    Raises:
        RandomWeightsRefused, ModelLoadError: see :func:`check_model_spec` and the model zoo.
        ConfigError: a layer name the model does not have (nearest names suggested) or that is
            not a cut of the network.
    """
    from pairx_core.layers import check_layers, default_layer
    from pairx_core.models import weights_digest, would_use_random_weights
    from infra.model_runtime import get_model

    check_model_spec(config.model, config.allow_random_weights)
    loaded = get_model(config.model, "cpu", config.storage_options or None)
    layers = tuple(config.layers) if config.layers else (default_layer(loaded.model),)
    check_layers(loaded.model, list(layers), tuple(loaded.preprocessing.size))
    facts = {"model_spec": redact_model_spec(config.model), "weights_digest": weights_digest(loaded.model),
             "random_weights": would_use_random_weights(config.model)}
    return ModelPlan(loaded.model_id, layers, facts)
