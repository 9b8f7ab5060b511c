"""GLUE task registry: text fields, label names, metrics. Other GLUE-format tasks are declared in the config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    text_fields: list[str] = Field(min_length=1, max_length=2)
    label_names: list[str] = Field(min_length=2)
    metrics: list[Literal["accuracy", "f1"]] = Field(default_factory=lambda: ["accuracy"])
    hub_dataset: str = "nyu-mll/glue"
    hub_config: str | None = None  # defaults to name
    # GLUE TSV layout: file names and the columns holding text and label (header names)
    tsv_train: str = "train.tsv"
    tsv_test: str = "dev.tsv"
    tsv_columns: dict[str, str] = Field(default_factory=dict)  # our field -> TSV header; identity when absent

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2


_BUILTIN = {
    "sst2": TaskSpec(name="sst2", text_fields=["sentence"], label_names=["negative", "positive"]),
    "mrpc": TaskSpec(
        name="mrpc",
        text_fields=["sentence1", "sentence2"],
        label_names=["not_equivalent", "equivalent"],
        metrics=["accuracy", "f1"],
        tsv_columns={"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
    ),
    "rte": TaskSpec(
        name="rte",
        text_fields=["sentence1", "sentence2"],
        label_names=["entailment", "not_entailment"],
    ),
}

# Original GLUE distribution folder names, for a directory of TSVs
GLUE_TSV_DIRS = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE"}


def builtin_tasks() -> dict[str, TaskSpec]:
    return dict(_BUILTIN)
