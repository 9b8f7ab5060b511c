"""The one typed study configuration that flows through every phase.

Loaded from YAML, overridden with ``--set key=value`` (dotted keys, YAML-typed values), validated by pydantic with
unknown keys forbidden. Every error names the field and the file (``ConfigError``; the CLI exits with code 2).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorastudy.tasks import TaskSpec, builtin_tasks

Method = Literal["full", "lora"]
METHODS: tuple[str, ...] = ("full", "lora")


class ConfigError(ValueError):
    """A bad configuration: the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FloatRange(_Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"empty range: low ({self.low}) > high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log range needs low > 0, got {self.low}")
        return self


class IntRange(_Strict):
    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"empty range: low ({self.low}) > high ({self.high})")
        return self


class SearchSpace(_Strict):
    """Optuna search space for one method. ``None`` = not searched (the value from ``train``/``lora`` is used)."""

    lr: FloatRange
    batch_size: list[int] = Field(default_factory=lambda: [1, 2, 4])
    warmup_ratio: FloatRange = FloatRange(low=0.0, high=0.2)
    weight_decay: FloatRange = FloatRange(low=0.0, high=0.01)
    epochs: IntRange = IntRange(low=2, high=4)
    lora_alpha: IntRange | None = None
    lora_dropout: FloatRange | None = None

    @field_validator("batch_size")
    @classmethod
    def _nonempty(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch_size choices must be a non-empty list of positive integers")
        return v


def _default_spaces() -> dict[str, SearchSpace]:
    return {
        "full": SearchSpace(lr=FloatRange(low=1e-6, high=5e-5, log=True)),
        "lora": SearchSpace(
            lr=FloatRange(low=5e-5, high=5e-3, log=True),
            warmup_ratio=FloatRange(low=0.0, high=0.3),
            weight_decay=FloatRange(low=0.0, high=0.1),
            lora_alpha=IntRange(low=8, high=64),
            lora_dropout=FloatRange(low=0.0, high=0.2),
        ),
    }


class ModelConfig(_Strict):
    # hub id | local dir | file.gguf | "smollm2-135m" | "tiny-random-llama"
    source: str = "tiny-random-llama"
    revision: str | None = None
    padding_side: Literal["left", "right"] = "right"
    # tiny-random-llama only: architecture knobs, so tests and CI stay fast
    tiny_hidden_size: int = Field(64, ge=8)
    tiny_layers: int = Field(2, ge=1)


class DataConfig(_Strict):
    # "hub" (nyu-mll/glue through `datasets`) or a directory of <task>/{train,validation}.parquet or GLUE TSVs.
    # The environment variable LORASTUDY_GLUE_DIR, when set, replaces "hub" (no network here).
    source: str = "hub"
    max_length: int = Field(384, ge=8)
    split_seed: int = 0
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    validation_max: int = Field(2000, ge=4)
    # Optional per-task row caps (a seeded stratified subset), for quick/tiny studies. None = all rows.
    train_limit: dict[str, int] = Field(default_factory=dict)
    validation_limit: dict[str, int] = Field(default_factory=dict)
    test_limit: dict[str, int] = Field(default_factory=dict)
    probe_size: int = Field(750, ge=4)


class LoraSettings(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class TrainConfig(_Strict):
    # per method: full FT and LoRA need learning rates two orders of magnitude apart
    lr: dict[str, float] = Field(default_factory=lambda: {"full": 2e-5, "lora": 5e-4})
    batch_size: int = Field(4, ge=1)
    epochs: float = Field(3, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(0.3, gt=0)
    max_steps: int | None = Field(None, ge=1)
    evals_per_epoch: int = Field(4, ge=1)
    patience: int = Field(3, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    group_by_length: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    save_model: bool = True  # phase-2 runs keep the adapter / full model (extraction needs them)
    # Pad every batch to the smallest of these widths that fits it (static shapes, the first step towards CUDA
    # graphs / torch.compile on GPU). Same results as dynamic padding: masking and mask-derived position ids.
    shape_buckets: list[int] | None = None
    # The training/evaluation step: ``cuda_graph`` = static shapes (shape_buckets, or a default set) replayed as
    # CUDA graphs; ``static`` = the same static-shape code run eagerly (CPU equivalence tests, debugging);
    # ``eager`` = the plain eager reference path (also ``false``); ``auto`` = cuda_graph on a CUDA device, eager
    # elsewhere.
    fast_step: Literal["auto", "eager", "static", "cuda_graph"] = "auto"

    @field_validator("fast_step", mode="before")
    @classmethod
    def _fast_step_bool(cls, v: Any) -> Any:
        # YAML reads off/false/no as False: accept it as "eager", and true as "auto"
        return {False: "eager", True: "auto"}.get(v, v) if isinstance(v, bool) else v


class SanityConfig(_Strict):
    n_examples: int = Field(10, ge=2)
    target_loss: float = Field(0.1, gt=0)
    max_steps: int = Field(300, ge=1)
    lr: dict[str, float] = Field(default_factory=lambda: {"full": 1e-4, "lora": 3e-3})


class SearchConfig(_Strict):
    n_trials: int = Field(15, ge=1)
    seed: int = 42
    # Training rows used during search, per task (SST-2 on 3,000 by the protocol); absent = full train split.
    train_subset: dict[str, int] = Field(default_factory=lambda: {"sst2": 3000})
    storage: str | None = None  # SQLAlchemy URL; default sqlite file in the results dir
    spaces: dict[str, SearchSpace] = Field(default_factory=_default_spaces)
    max_steps: int | None = Field(None, ge=1)  # cap per trial (quick/tiny presets)


class ExtractConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    dtype: Literal["float32", "float16"] = "float32"


class DriftConfig(_Strict):
    n_resamples: int = Field(10000, ge=100)
    seed: int = 0
    h1a_margin_points: float = 3.0
    h1b_min_reduction: float = 0.20
    alpha: float = Field(0.05, gt=0, lt=1)


class ServeConfig(_Strict):
    engines: list[Literal["merged", "peft", "batched", "vllm"]] = Field(
        default_factory=lambda: ["merged", "peft", "batched"]
    )
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    max_adapters: int | None = None  # None = every trained adapter (tasks x seeds)
    seq_len: int | None = 64  # None = the median token length of the study's probe texts
    warmup: int = Field(100, ge=0)
    requests: int = Field(1000, ge=1)
    # timed requests (and at most as many warm-up) for rows without CUDA graphs (eager, peft), which take 5-20x
    # longer on GPU; None: the same as requests
    eager_requests: int | None = Field(None, ge=1)
    synthetic_arch: Literal["tinyllama", "smollm2"] | None = None
    cuda_graphs: bool = True
    fuse: bool = True  # fused sibling projections and RMSNorm for merged and batched (serving/fuse.py)
    h2_max_overhead: float = 0.30


class StudyConfig(_Strict):
    name: str = "study"
    output_dir: str = "results/{name}"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tasks: list[str] = Field(default_factory=lambda: ["sst2", "mrpc", "rte"])
    custom_tasks: dict[str, TaskSpec] = Field(default_factory=dict)
    methods: list[Method] = Field(default_factory=lambda: ["full", "lora"])
    seeds: list[int] = Field(default_factory=lambda: [42, 1337, 2024])
    lora: LoraSettings = LoraSettings()
    train: TrainConfig = TrainConfig()
    sanity: SanityConfig = SanityConfig()
    search: SearchConfig = SearchConfig()
    extract: ExtractConfig = ExtractConfig()
    drift: DriftConfig = DriftConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _known_tasks(self) -> StudyConfig:
        known = set(builtin_tasks()) | set(self.custom_tasks)
        bad = [t for t in self.tasks if t not in known]
        if bad:
            raise ValueError(f"tasks: unknown task(s) {bad}; known: {sorted(known)} (declare others in custom_tasks)")
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        if not self.methods:
            raise ValueError("methods: at least one method is needed")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError("seeds: need at least one seed, no duplicates")
        for m in self.methods:
            if m not in self.search.spaces:
                raise ValueError(f"search.spaces: no search space for method {m!r}")
        return self

    # -- derived -------------------------------------------------------------------------------------------------
    def task(self, name: str) -> TaskSpec:
        return {**builtin_tasks(), **self.custom_tasks}[name]

    @property
    def out(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def data_source(self) -> str:
        """``hub`` unless LORASTUDY_GLUE_DIR names a local GLUE directory (the offline fallback)."""
        env = os.environ.get("LORASTUDY_GLUE_DIR")
        if self.data.source == "hub" and env:
            return env
        return self.data.source

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Hash of everything that changes results (not where they are written)."""
        d = self.resolved()
        d.pop("output_dir", None)
        d.pop("serve", None)  # benchmark knobs do not change trained models
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# -- loading ---------------------------------------------------------------------------------------------------------
def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string; a number is meant
            try:
                value = float(value)
            except ValueError:
                pass
        out.append((key.strip(), value))
    return out


def _format_validation(err: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if not e["loc"]:  # a whole-config check: its message names the field; the input is the whole config
            lines.append(f"  field {msg.removeprefix('Value error, ')}")
            continue
        # a section's input is the whole section: too long to help
        got = "" if e["type"] == "extra_forbidden" or isinstance(e["input"], dict) else f" (got {e['input']!r})"
        lines.append(f"  field {loc}: {msg}{got}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, where)) from None
    sets = parse_overrides(overrides)
    if not sets:
        return cfg
    # overrides apply to the resolved config, so a nested default (e.g. a search space) can be changed key by key
    resolved = cfg.model_dump(mode="python", exclude_unset=False)
    for key, value in sets:
        _set_dotted(resolved, key, value)
    try:
        return StudyConfig.model_validate(resolved)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, f"{where} with --set " + ", ".join(k for k, _ in sets))) from None


def dump_yaml(cfg: StudyConfig) -> str:
    return yaml.safe_dump(cfg.resolved(), sort_keys=False)
