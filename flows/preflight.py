"""Checks that run before anything expensive starts: inputs, model spec, layers.

:func:`check_inputs` only reads listings and small files (about a second; no torch, no Prefect):
the CLI calls it before it starts a Prefect server, a cluster or a model, so a missing share or a
broken pairs table fails in seconds with one line. :func:`resolve_model` builds the model on the
CPU of the calling process (once per process, see ``infra.model_runtime``), picks the family's default
layer when none is given and checks the layer names; the CLI calls it before the run starts, and
every work flow needs its result first (``flows.run_context.model_plan``: the CLI's resolution
when it started the run, else resolved there), so deployments get the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infra.inputs import InputError, PathRules, list_uploads_counted, listed_sizes, read_pairs
from infra.night_items import gallery_items
from infra.model_store import redact_model_spec
from infra.storage import OutputLayout, StorageTarget
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
    #: more about the inputs, printed after the counts (e.g. which models a reprocess redoes)
    detail: str = ""

    def describe(self, config) -> str:
        counts = ", ".join(f"{n} {what}" for what, n in self.counts.items())
        counts += f" {self.detail}" if self.detail else ""
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
    path = target.raw_path()
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


def check_layout(out: str, folders: dict[str, str], storage_options=None) -> None:
    """The output root must not lie inside an input folder (a night would read its own pictures)."""
    out_url = StorageTarget.from_url(out, storage_options).url("").rstrip("/")
    for what, folder in folders.items():
        if folder.endswith(".csv"):
            continue
        folder_url = StorageTarget.from_url(folder, storage_options).url("").rstrip("/")
        if out_url == folder_url or out_url.startswith(folder_url + "/"):
            raise InputError(out, f"the output folder lies inside the {what} folder {folder_url}; its pictures and "
                                  "tables would be read as input. Choose an output outside it")


def check_pairs_paths(config, items, sizes: dict[str, int | None] | None = None) -> dict[str, int]:
    """List every folder the pairs table references once (unless ``sizes``, from
    :func:`infra.inputs.listed_sizes`, are given); refuse the run when more than
    ``config.max_missing`` of the referenced images do not exist. Returns the counts for the plan."""
    so = config.storage_options or None
    uris = list(dict.fromkeys(uri for item in items if item.refusal is None for uri in (item.image_0, item.image_1)))
    sizes = listed_sizes(uris, so) if sizes is None else sizes
    missing = [uri for uri in uris if uri in sizes and sizes[uri] is None]
    if uris and len(missing) > config.max_missing * len(uris):
        raise InputError(config.pairs, f"{len(missing)} of the {len(uris)} images it references do not exist (more "
                                       f"than --max-missing {config.max_missing:.0%}), e.g. {', '.join(missing[:3])}")
    counts = {"pairs": len(items)}
    if missing:
        counts["missing images"] = len(missing)
    refused = sum(item.refusal is not None for item in items)
    if refused:
        counts["refused pairs"] = refused
    return counts


def pairs_rules(config) -> PathRules:
    return PathRules(allow_urls=config.allow_urls, allow_outside_root=config.allow_outside_root)


def check_inputs(flow: str, config) -> RunPlan:
    """Check a flow's inputs without running anything; return what the run will work on.

    Raises:
        InputError: a missing folder, an empty gallery, a gallery without individual folders, an
            output inside an input folder, a missing, empty, binary or malformed pairs table (file
            and problem named), too many missing images, a missing bucket.
    """
    so = config.storage_options or None
    check_output(config.out, so)
    if flow == "nightly":
        check_layout(config.out, {"uploads": config.uploads, "gallery": config.gallery}, so)
        uploads = list_uploads_counted(config.uploads, so)
        if config.detections:
            from infra.detections import read_detections

            selection = read_detections(config.detections, config.uploads, category=config.category,
                                        min_confidence=config.min_confidence, species=config.species,
                                        storage_options=so)
        gallery = gallery_items(config.gallery, so, unlabelled=config.unlabelled_gallery,
                                allow_outside_root=config.allow_outside_root)
        if not gallery:
            raise InputError(config.gallery, "the gallery has no images")
        counts = {"uploads": len(uploads.images), "gallery images": len(gallery)}
        if config.detections:
            counts["frames"], counts["detections"] = selection.counts.n_frames, selection.counts.n_detections
        if uploads.unsupported:
            counts["unsupported files"] = sum(uploads.unsupported.values())
        return RunPlan(flow, counts)
    if flow == "explain_pairs":
        items = read_pairs(config.pairs, config.image_root, so, pairs_rules(config))
        return RunPlan(flow, check_pairs_paths(config, items))
    if flow == "reprocess":
        if not StorageTarget.from_url(config.out, so).exists(OutputLayout.table_path("pairs")):
            raise InputError(config.out, "no pairs table under this output: nothing to reprocess")
        from .reprocess_plan import recorded_pairs_summary

        recorded = recorded_pairs_summary(config.out, config.old_model, so)
        return RunPlan(flow, recorded.counts(), recorded.detail())
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
    from infra.compute_thread import on_compute_thread
    from infra.model_runtime import get_model

    check_model_spec(config.model, config.allow_random_weights)
    loaded = get_model(config.model, "cpu", config.storage_options or None)

    def checked() -> tuple[tuple[str, ...], str]:  # the layer check runs the model once
        chosen = tuple(config.layers) if config.layers else (default_layer(loaded.model),)
        check_layers(loaded.model, list(chosen), tuple(loaded.preprocessing.size))
        return chosen, weights_digest(loaded.model)

    layers, digest = on_compute_thread(checked)
    facts = {"model_spec": redact_model_spec(config.model), "weights_digest": digest,
             "random_weights": would_use_random_weights(config.model)}
    return ModelPlan(loaded.model_id, layers, facts)
