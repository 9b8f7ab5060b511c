"""GLUE task registry: text fields, label names, metrics. Other GLUE-format tasks are declared in the config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    text_fields: list[str] = Field(min_length=1, max_length=2)
    label_names: list[str] = Field(min_length=2)
    # names in the metrics registry (lorastudy.metrics: accuracy, f1, mcc, ...); all are computed and reported
    metrics: list[str] = Field(default_factory=lambda: ["accuracy"], min_length=1)
    # drives tuning's objective, the collapse flag and the report; default: the first of ``metrics``
    primary_metric: str | None = None
    hub_dataset: str = "nyu-mll/glue"
    hub_config: str | None = None  # defaults to name
    # GLUE TSV layout: file names and the columns holding text and label (header names)
    tsv_train: str = "train.tsv"
    tsv_test: str = "dev.tsv"
    # our field -> TSV header; identity when absent
    tsv_columns: dict[str, str | NonNegativeInt] = Field(default_factory=dict)
    # headerless TSVs (e.g. CoLA's): tsv_header false, and tsv_columns maps every text field and "label" to a
    # 0-based column index
    tsv_header: bool = True

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        from lorastudy.metrics import MetricError, check_metrics

        try:
            check_metrics(self.metrics, len(self.label_names))
        except MetricError as e:
            raise ValueError(f"metrics: {e}") from None
        if self.primary_metric is not None and self.primary_metric not in self.metrics:
            raise ValueError(f"primary_metric {self.primary_metric!r} is not one of metrics {self.metrics}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics: duplicates in {self.metrics}")
        if not self.tsv_header:
            need = [*self.text_fields, "label"]
            bad = [f for f in need if not isinstance(self.tsv_columns.get(f), int) or self.tsv_columns[f] < 0]
            if bad:
                raise ValueError(f"tsv_header is false: tsv_columns must give a 0-based column index for {bad} "
                                 f"(e.g. {{{need[0]}: 3, label: 1}})")
        elif any(isinstance(v, int) for v in self.tsv_columns.values()):
            raise ValueError("tsv_columns: column indices need tsv_header: false (with a header, give names)")
        return self

    @property
    def primary(self) -> str:
        """The primary metric's name."""
        return self.primary_metric or self.metrics[0]

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
