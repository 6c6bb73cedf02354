"""Flow configs: one pydantic object per flow, validated at the boundary."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

DEFAULT_MODEL = "timm:efficientnet_b0?size=128"
DEFAULT_LAYERS = ("backbone.blocks.3",)


class CommonConfig(BaseModel):
    """Options shared by every flow."""

    out: str = Field(description="output root URL (local folder, s3://bucket/prefix, memory://...)")
    model: str = Field(DEFAULT_MODEL, description="model spec, see pairx_core.models")
    layers: list[str] = Field(default_factory=lambda: list(DEFAULT_LAYERS), min_length=1)
    k_lines: int = Field(20, ge=0, description="matches drawn as lines")
    k_colors: int = Field(10, ge=0, description="matches drawn as pixel-relevance regions (0: skip)")
    cache: str | None = Field(None, description="activation cache URL (default: <out>/cache)")
    cluster: str | None = Field(None, description="existing Dask scheduler address, e.g. tcp://host:8786")
    workers: int | None = Field(None, ge=1, description="local Dask workers (default: sized to the machine)")
    batch_pairs: int = Field(8, ge=1, description="pairs per task batch")
    device: str | None = Field(None, description="cpu, cuda or None (auto)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    render: bool = True
    public_url: str | None = Field(None, description="base URL where OUT is published: viz_uri columns and report links become URLs under it")

    @field_validator("out")
    @classmethod
    def _strip(cls, value: str) -> str:
        if not value:
            raise ValueError("out must be a non-empty URL")
        return value.rstrip("/")

    @property
    def cache_url(self) -> str:
        return self.cache or f"{self.out}/cache"


class ExplainPairsConfig(CommonConfig):
    pairs: str = Field(description="pairs table (CSV or Parquet): image_0, image_1[, pair_id, box_0, box_1, theta_0, theta_1]")
    image_root: str | None = Field(None, description="prefix for relative image paths")


class NightlyConfig(CommonConfig):
    uploads: str = Field(description="folder of new photos (listed recursively)")
    gallery: str = Field(description="gallery folder (one sub-folder per individual) or manifest CSV image,individual")
    top_k: int = Field(3, ge=1, description="candidates explained per upload")
    retry_failed: bool = Field(False, description="try again the uploads that failed to load on an earlier night "
                                                  "(by default they are skipped: reported once, not every night)")


class ReprocessConfig(CommonConfig):
    old_model: str | None = Field(None, description="model_id whose pairs to redo (default: every other model)")
