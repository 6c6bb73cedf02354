"""What a ``reprocess`` run will redo, read from the output tables before anything runs.

Only tables are read (no torch, no Prefect): the CLI prints the plan line before it starts a
server or a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infra.report.data import gallery_individuals as individuals_of
from infra.tables import read_table

#: model ids named in the plan line before "and N more"
SHOWN_MODELS = 3


@dataclass(frozen=True)
class RecordedPairs:
    """The pairs recorded under an output root (of ``old_model``, or of every model)."""

    pairs: int
    #: pairs per model_id, most first
    models: dict[str, int]
    #: individuals of the pairs' second images, from the candidates table (nightly runs record them)
    individuals: int

    def counts(self) -> dict[str, int]:
        return {"recorded pairs": self.pairs, "model(s)": len(self.models), "individual(s)": self.individuals}

    def detail(self) -> str:
        """``"from m-a (12), m-b (3)"``: the models whose pairs are redone."""
        shown = [f"{model} ({n})" for model, n in list(self.models.items())[:SHOWN_MODELS]]
        more = len(self.models) - SHOWN_MODELS
        return "from " + ", ".join(shown) + (f" and {more} more" if more > 0 else "") if shown else "nothing recorded"


def gallery_individuals(out: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Gallery image URI -> individual, as the candidates table recorded them (latest row wins)."""
    candidates = read_table(out, "candidates", columns=["gallery_image", "individual", "created_at"],
                            storage_options=storage_options)
    return individuals_of(candidates.sort_values("created_at", kind="stable"))


def recorded_pairs_summary(out: str, old_model: str | None = None,
                           storage_options: Mapping[str, Any] | None = None) -> RecordedPairs:
    pairs = read_table(out, "pairs", columns=["pair_id", "model_id", "image_1"], storage_options=storage_options)
    if old_model:
        pairs = pairs[pairs["model_id"] == old_model]
    individuals = gallery_individuals(out, storage_options)
    per_model = pairs.drop_duplicates(["model_id", "pair_id"])["model_id"].value_counts()
    named = {individuals[image] for image in pairs["image_1"].unique() if image in individuals}
    return RecordedPairs(pairs=int(pairs["pair_id"].nunique()),
                         models={str(k): int(v) for k, v in per_model.items()}, individuals=len(named))
