"""Flow configs: one pydantic object per flow, validated at the boundary.

A config is a flow run's only parameter, and Prefect stores parameters in its database and shows
them in its UI: a config never holds credentials. Storage keys and secrets reach every process
out of band (``$PAIRX_STORAGE_OPTIONS``, the standard AWS variables, or a Prefect secret block
read by the workers); ``storage_options`` here is for harmless settings (``anon``, region,
endpoint) and refuses anything that looks like a secret.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field, field_validator

from .placeholders import refuse_placeholder

#: option names that carry credentials; refused in configs (they would be stored by Prefect)
SECRET_OPTION = re.compile(r"(secret|password|passwd|token|credential|^key$|_key$|access_key|private)", re.I)


def _secret_option_names(options: Any, prefix: str = "") -> list[str]:
    names = []
    if isinstance(options, dict):
        for key, value in options.items():
            path = f"{prefix}{key}"
            if SECRET_OPTION.search(str(key)):
                names.append(path)
            names += _secret_option_names(value, path + ".")
    return names


class CommonConfig(BaseModel):
    """Options shared by every flow."""

    out: str = Field(description="output root URL (local folder, s3://bucket/prefix, memory://...)")
    model: str = Field(description="model spec, see pairx_core.models (e.g. miewid?weights=URL, demo)")
    layers: list[str] | None = Field(None, min_length=1,
                                     description="layers to explain (default: the model family's default layer)")
    allow_random_weights: bool = Field(False, description="accept a model spec without weights (random "
                                                          "initialisation: pictures and scores mean nothing)")
    k_lines: int = Field(20, ge=0, description="matches drawn as lines")
    k_colors: int = Field(10, ge=0, description="matches drawn as pixel-relevance regions (0: skip)")
    cache: str | None = Field(None, description="activation cache URL (default: <out>/cache)")
    cluster: str | None = Field(None, description="existing Dask scheduler address, e.g. tcp://host:8786")
    workers: int | None = Field(None, ge=0, description="local Dask workers (default: sized to the machine); "
                                                      "0 runs the tasks in the flow's own process, without Dask")
    batch_pairs: int = Field(8, ge=1, description="pairs per task batch")
    device: str | None = Field(None, description="cpu, cuda or None (auto)")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="non-secret fsspec options; credentials go in the "
                                                        "workers' environment ($PAIRX_STORAGE_OPTIONS, AWS_*)")
    render: bool = True
    render_in_background: bool = Field(True, description="draw a batch's pictures in a thread while the next "
                                                         "batch computes (False: after the engine, in turn)")
    min_image_side: int = Field(32, ge=1, description="images whose shorter side has fewer pixels are errors")
    report: bool = Field(True, description="write or update the review site (OUT's report folder) at the end of the "
                                                   "run")
    lease_wait_s: float = Field(1800.0, ge=0, description="how long to wait while another run writes the same "
                                                          "output (its lease), before giving up")

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        secret = _secret_option_names(value)
        if secret:
            raise ValueError(
                f"storage_options {secret} look like credentials; a flow's config is stored by Prefect, so pass "
                "them out of band: the environment variable PAIRX_STORAGE_OPTIONS (JSON) or AWS_* variables of "
                "the processes that run the flow and its workers (the CLI's --storage-option does this)")
        return value
    public_url: str | None = Field(None, description="base URL where OUT is published: viz_uri columns and "
                                                     "report links become URLs under it")

    @field_validator("*")
    @classmethod
    def _no_placeholders(cls, value: Any) -> Any:
        return refuse_placeholder(value)

    @field_validator("out")
    @classmethod
    def _strip(cls, value: str) -> str:
        if not value:
            raise ValueError("out must be a non-empty URL")
        return value.rstrip("/")

    @property
    def cache_url(self) -> str:
        from infra.storage import OutputLayout

        return self.cache or OutputLayout(self.out).cache


class ExplainPairsConfig(CommonConfig):
    pairs: str = Field(description="pairs table (CSV or Parquet): "
                                   "image_0, image_1[, pair_id, box_0, box_1, theta_0, theta_1]")
    image_root: str | None = Field(None, description="prefix for relative image paths")
    max_missing: float = Field(0.05, ge=0.0, le=1.0, description="largest share of referenced images that may be "
                                                               "missing before the run is refused (checked up front)")
    allow_urls: bool = Field(False, description="with image_root: read URL entries (http://, file://, s3://) as "
                                                "written instead of refusing them per row")
    allow_outside_root: bool = Field(False, description="with image_root: read absolute paths and paths that leave "
                                                        "it (..) instead of refusing them per row")


class NightlyConfig(CommonConfig):
    uploads: str = Field(description="folder of new photos (listed recursively)")
    gallery: str = Field(description="gallery folder (one sub-folder per individual) or manifest CSV image,individual")
    top_k: int = Field(3, ge=1, description="candidates explained per upload")
    rerank_k: int = Field(5, ge=0, description="candidates per upload re-ranked by PAIR-X plausibility: the top_k "
                                               "most similar explained in full, the others judged by stage 1 (from "
                                               "the activation cache), those lifted into the top_k explained too; "
                                               "0, or not more than top_k: explain the top_k by similarity only")
    retry_failed: bool = Field(False, description="try again the uploads that failed to load on an earlier night "
                                                  "(by default they are skipped: reported once, not every night)")
    unlabelled_gallery: bool = Field(False, description="accept a gallery folder without individual folders "
                                                        "(every individual unknown)")
    allow_outside_root: bool = Field(False, description="read gallery manifest entries that leave the manifest's "
                                                        "folder (..)")
    detections: str | None = Field(None, description="detector output (MegaDetector batch-output JSON) for the "
                                                     "uploads: each kept detection is one upload, cropped to its box")
    category: str = Field("animal", description="with detections: the detection category kept")
    min_confidence: float | None = Field(None, ge=0.0, le=1.0,
                                         description="with detections: the confidence threshold (default: the "
                                                     "file's typical_detection_threshold, else 0.2)")
    species: str | None = Field(None, description="with detections: keep only detections whose top "
                                                  "classification is this name")
    confirmed: bool = Field(True, description="add the uploads confirmed on earlier nights in this output (latest "
                                              "decision match or new_individual) to the gallery")

    @property
    def reranks(self) -> bool:
        """Whether stage 1 runs: only when it judges more candidates than the ``top_k`` explained.

        With ``rerank_k <= top_k`` it would judge exactly the pairs the engine explains and compute
        the metrics the engine computes again, so those ``top_k`` are explained and ranked by their
        own metrics, as with ``rerank_k`` 0 (never fewer than ``top_k`` explained)."""
        return self.rerank_k > self.top_k


class ReprocessConfig(CommonConfig):
    old_model: str | None = Field(None, description="model_id whose pairs to redo (default: every other model)")
