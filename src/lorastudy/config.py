"""The one typed study configuration that flows through every phase.

Loaded from YAML, overridden with ``--set key=value`` (dotted keys, YAML-typed values), validated by pydantic with
unknown keys forbidden. Every error names the field and the file (``ConfigError``; the CLI exits with code 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorastudy.tasks import TaskSpec, builtin_tasks

Method = Literal["full", "lora"]
METHODS: tuple[str, ...] = ("full", "lora")


class ConfigError(ValueError):
    """A bad configuration: the message names the file and the field."""


def _wants_number(tp) -> bool:
    """Whether a field's type is a number (int/float; optional, or a list or dict of them): a boolean is then wrong."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _wants_number(args[0])
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return bool(rest) and all(_wants_number(a) for a in rest)
    if origin in (list, dict):  # the items' (a dict's values') type
        return bool(args) and _wants_number(args[-1])
    return tp in (int, float)


def _has_bool(v) -> bool:
    items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v]
    return any(isinstance(x, bool) for x in items)


# How runs are executed, not what they compute: the fast step (static shapes, CUDA graphs), fused multi-run training,
# the step levers and their compile options, and the checkpoint interval. Each is tested to compute the same thing
# as the reference path (up to floating-point summation order; tests/test_fast_step.py, test_fused.py,
# test_step_levers.py), so they stay out of the config hash (a study may change them between phases or task
# shards: merge.SHARD_FREE_KEYS) and every run's metrics.json records the ones it ran with (step_mode,
# step_levers). Dotted keys of the resolved config.
EXECUTION_KEYS = ("train.fast_step", "train.fuse", "train.fuse_max_runs", "train.fuse_optimizer", "train.step_levers",
                  "train.compile_mode", "train.compile_dynamic", "train.compile_cache_dir",
                  "train.checkpoint_every_min")


class _Strict(BaseModel):
    # validate_default: defaults pass the same checks (a default of 3 for a float field becomes 3.0, so nothing
    # downstream casts with type(default)); no inf/nan anywhere
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, v: Any, info) -> Any:
        # pydantic's lax mode reads true/false as 1/0 for int and float fields: `--set train.epochs=true` would run
        # one epoch; YAML gives numbers as numbers, so strict mode is not needed for anything else
        if _has_bool(v) and _wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not a boolean")
        return v


PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # numpy and torch both accept it


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


def _within(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A check that a search range lies inside the hyperparameter's own range (e.g. a learning rate > 0)."""
    def check(r):
        if r is None:
            return r
        if lo is not None and (r.low <= lo if lo_open else r.low < lo):
            raise ValueError(f"low ({r.low}) must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and (r.high >= hi if hi_open else r.high > hi):
            raise ValueError(f"high ({r.high}) must be {'<' if hi_open else '<='} {hi}")
        return r
    return AfterValidator(check)


class SearchSpace(_Strict):
    """Optuna search space for one method. ``None`` = not searched (the value from ``train``/``lora`` is used).
    Each range lies inside its hyperparameter's valid range (the same as ``HParamValues``)."""

    lr: Annotated[FloatRange, _within(lo=0, lo_open=True)]
    batch_size: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4])
    warmup_ratio: Annotated[FloatRange, _within(lo=0, hi=1)] = FloatRange(low=0.0, high=0.2)
    weight_decay: Annotated[FloatRange, _within(lo=0)] = FloatRange(low=0.0, high=0.01)
    epochs: Annotated[IntRange, _within(lo=1)] = IntRange(low=2, high=4)
    lora_alpha: Annotated[IntRange | None, _within(lo=1)] = None
    lora_dropout: Annotated[FloatRange | None, _within(lo=0, hi=1, hi_open=True)] = None

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
    tiny_hidden_size: int = Field(64, ge=8, multiple_of=8)  # 4 heads of an even width (rotary embeddings)
    tiny_layers: int = Field(2, ge=1)


class DataConfig(_Strict):
    # "hub" (nyu-mll/glue through `datasets`) or a directory of <task>/{train,validation}.parquet or GLUE TSVs.
    # The environment variable LORASTUDY_GLUE_DIR, when set, replaces "hub" (no network here).
    # The config hash covers the data's content (file checksums; for "hub" the dataset id and revision), not its path.
    source: str = "hub"
    hub_revision: str | None = None  # "hub" only: a dataset revision (git tag/commit) to pin
    max_length: int = Field(384, ge=8)
    split_seed: Seed = 0
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    validation_max: int = Field(2000, ge=4)
    # Optional per-task row caps (a seeded stratified subset), for quick/tiny studies. None = all rows.
    train_limit: dict[str, PositiveInt] = Field(default_factory=dict)
    validation_limit: dict[str, PositiveInt] = Field(default_factory=dict)
    test_limit: dict[str, PositiveInt] = Field(default_factory=dict)
    probe_size: int = Field(750, ge=4)
    # Text fields: "strip" removes surrounding whitespace before tokenization (SST-2 sentences end with a space that
    # SmolLM2 encodes as its own token); "none" keeps them as stored. Applied by data.encode, so in every phase.
    normalize_text: Literal["strip", "none"] = "strip"
    # Pair tasks: "auto" = the tokenizer's own pair encoding when it puts a token between the segments, else the
    # segments joined by a newline ("{a}\n{b}"); "tokenizer"; or a text template with {a} and {b}, e.g.
    # "Premise: {a}\nHypothesis: {b}". Runs record the resolved template in their config.yaml (data.encode).
    pair_template: str = "auto"

    @field_validator("pair_template")
    @classmethod
    def _template(cls, v: str) -> str:
        from lorastudy.data import parse_pair_template

        parse_pair_template(v)
        return v


class LoraSettings(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class TrainConfig(_Strict):
    # per method: full FT and LoRA need learning rates two orders of magnitude apart
    lr: dict[str, PositiveFloat] = Field(default_factory=lambda: {"full": 2e-5, "lora": 5e-4})
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
    shape_buckets: list[PositiveInt] | None = None
    # The training/evaluation step: ``cuda_graph`` = static shapes (shape_buckets, or a default set) replayed as
    # CUDA graphs; ``static`` = the same static-shape code run eagerly (CPU equivalence tests, debugging);
    # ``eager`` = the plain eager reference path (also ``false``); ``auto`` = cuda_graph on a CUDA device, eager
    # elsewhere.
    fast_step: Literal["auto", "eager", "static", "cuda_graph"] = "auto"
    # Fused multi-run training (fused.py): `tune` and `train-all` train runs of one method as one model, N runs'
    # weights stacked; `on` = always (on CPU through the static path, as the tests compare), `off` = one model per
    # run (the reference path), `auto` = on when runs train on a CUDA device with fast_step auto or cuda_graph.
    fuse: Literal["auto", "on", "off"] = "auto"
    fuse_max_runs: int = Field(32, ge=1, le=1024)  # runs (slots) per fused group
    # A fused group's optimizer pass (fused_step.resolve_optimizer): `triton` = one pass per buffer (clip scale,
    # decay, AdamW, compute copy: fused_adamw.py), `torch` = torch.optim.AdamW after separate passes (the
    # reference), `auto` = triton on CUDA with Triton, else torch.
    fuse_optimizer: Literal["auto", "torch", "triton"] = "auto"
    # Minutes between a run's mid-run checkpoints (checkpoint.py; 0 = none: runs still checkpoint on SIGTERM/SIGINT
    # and at --time-budget). Like the other EXECUTION_KEYS, not in the config hash: it does not change results.
    checkpoint_every_min: float = Field(10.0, ge=0, le=1440)
    # Speed levers of the static / CUDA-graph step (step_levers.py; ignored by the eager path): any of
    # bf16_weights, flat_optimizer, compile, fused_kernels (CUDA + liger-kernel), lora_fused, fused_projections.
    # Each is tested to compute the same thing; benchmarks/train_step.py --parts levers measures them.
    step_levers: list[str] = Field(default_factory=list)
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"  # Inductor mode of ``compile``
    compile_dynamic: bool = False  # ``compile``: one graph for all padded widths instead of one per width
    # Inductor's cache (compiled graphs, autotuning) for ``compile``; relative = under output_dir
    compile_cache_dir: str | None = ".cache/inductor"

    @field_validator("step_levers")
    @classmethod
    def _known_levers(cls, v: list[str]) -> list[str]:
        from lorastudy.step_levers import LEVERS

        unknown = [n for n in v if n not in LEVERS]
        if unknown:
            raise ValueError(f"unknown step lever(s) {unknown}; known: {sorted(LEVERS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"step lever listed twice: {v}")
        return v

    @field_validator("fast_step", mode="before")
    @classmethod
    def _fast_step_bool(cls, v: Any) -> Any:
        # YAML reads off/false/no as False: accept it as "eager", and true as "auto"
        return {False: "eager", True: "auto"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("fuse", mode="before")
    @classmethod
    def _fuse_bool(cls, v: Any) -> Any:
        # YAML reads on/off as booleans
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v


class SanityConfig(_Strict):
    n_examples: int = Field(10, ge=2)
    target_loss: float = Field(0.1, gt=0)
    max_steps: int = Field(300, ge=1)
    lr: dict[str, PositiveFloat] = Field(default_factory=lambda: {"full": 1e-4, "lora": 3e-3})


class SearchConfig(_Strict):
    n_trials: int = Field(15, ge=1)
    seed: Seed = 42
    # Training rows used during search, per task (SST-2 on 3,000 by the protocol); absent = full train split.
    train_subset: dict[str, PositiveInt] = Field(default_factory=lambda: {"sst2": 3000})
    storage: str | None = None  # SQLAlchemy URL; default sqlite file in the results dir
    spaces: dict[str, SearchSpace] = Field(default_factory=_default_spaces)
    max_steps: int | None = Field(None, ge=1)  # cap per trial (quick/tiny presets)


class ExtractConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    dtype: Literal["float32", "float16"] = "float32"


class DriftConfig(_Strict):
    n_resamples: int = Field(10000, ge=100)
    seed: Seed = 0
    h1a_margin_points: float = Field(3.0, ge=0, le=100)
    h1b_min_reduction: float = Field(0.20, ge=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)


class ServeConfig(_Strict):
    engines: list[Literal["merged", "peft", "batched", "vllm"]] = Field(
        default_factory=lambda: ["merged", "peft", "batched", "vllm"]  # vllm: skipped with a message when absent
    )
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    max_adapters: int | None = Field(None, ge=1)  # None = every trained adapter (tasks x seeds)
    seq_len: int | None = Field(64, ge=1)  # None = the median token length of the study's probe texts
    warmup: int = Field(100, ge=0)
    requests: int = Field(1000, ge=1)
    # timed requests (and at most as many warm-up) for rows without CUDA graphs (eager, peft), which take 5-20x
    # longer on GPU (at 1,000 they made a protocol study's serving phase ~20 minutes); at most `requests`;
    # None: the same as requests
    eager_requests: int | None = Field(100, ge=1)
    synthetic_arch: Literal["tinyllama", "smollm2"] | None = None
    # random-weight architectures the serving phase also times, each with len(tasks) x len(seeds) synthetic
    # adapters, into phase4/deployment/<arch>/ (timing depends on shapes, not weights: the paper's TinyLlama-1.1B
    # beside a study of a smaller model); the report gives their H2, the study's H2 is its own adapters'
    archs: list[Literal["tinyllama", "smollm2"]] = Field(default_factory=list)

    @field_validator("archs")
    @classmethod
    def _distinct_archs(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"serve.archs lists an architecture twice: {v}")
        return v
    cuda_graphs: bool = True
    fuse: bool = True  # fused sibling projections and RMSNorm for merged and batched (serving/fuse.py)
    h2_max_overhead: float = Field(0.30, ge=0)
    # timed calls of each condition split into this many blocks, interleaved in time; the overhead CI resamples them
    repeats: int = Field(10, ge=2, le=1000)
    vllm_cuda_graphs: bool = True  # vLLM engines with CUDA graphs (False: enforce_eager, faster start)
    vllm_start_timeout_s: float = Field(900.0, gt=0, le=7200)  # a vLLM worker's import + engine start
    vllm_gpu_memory_utilization: float = Field(0.25, gt=0, lt=1)  # vLLM's start check; KV cache is sized exactly


class TrackingConfig(_Strict):
    """Experiment tracking (tracking.py): tuning trials and phase-2 runs as tracked runs. Off by default."""

    # a name in tracking.BACKENDS: none | mlflow | wandb (the last two: pip install 'lorastudy[tracking]')
    backend: str = "none"
    log_full_models: bool = False  # full fine-tuned models as artifacts too (GBs each); LoRA adapters always
    experiment: str | None = Field(None, min_length=1)  # MLflow experiment / W&B project; None: the study name
    # MLflow tracking URI; None: a SQLite store under the results dir (<output_dir>/tracking/mlflow.db)
    mlflow_uri: str | None = Field(None, pattern=r"^([A-Za-z][A-Za-z0-9+.-]*:.+|databricks)$")
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: runs under <output_dir>/tracking, `wandb sync`
    wandb_entity: str | None = Field(None, min_length=1)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from lorastudy.tracking import check_backend

        check_backend(v)  # ValueError naming the known backends, or the package to install
        return v


class StudyConfig(_Strict):
    name: str = Field("study", min_length=1)  # empty: output_dir results/{name} would be results/ itself
    output_dir: str = Field("results/{name}", min_length=1)  # empty: the current directory
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tasks: list[str] = Field(default_factory=lambda: ["sst2", "mrpc", "rte"])
    custom_tasks: dict[str, TaskSpec] = Field(default_factory=dict)
    methods: list[Method] = Field(default_factory=lambda: ["full", "lora"])
    seeds: list[Seed] = Field(default_factory=lambda: [42, 1337, 2024])
    lora: LoraSettings = LoraSettings()
    train: TrainConfig = TrainConfig()
    sanity: SanityConfig = SanityConfig()
    search: SearchConfig = SearchConfig()
    extract: ExtractConfig = ExtractConfig()
    drift: DriftConfig = DriftConfig()
    serve: ServeConfig = ServeConfig()
    tracking: TrackingConfig = TrackingConfig()

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

    def hash(self, leave_out: tuple[str, ...] = EXECUTION_KEYS) -> str:
        """Hash of everything that changes results (not where they are written): the data enters by its content
        (``data.data_fingerprint``: file checksums, or the hub dataset id and revision), not by ``data.source``,
        so ``--data-dir DIR``, ``--set data.source=DIR`` and ``LORASTUDY_GLUE_DIR=DIR`` hash alike and other data
        hashes differently. ``EXECUTION_KEYS`` (how the runs are executed: step path, fusion, levers, checkpoint
        interval) are left out: each is tested to compute the same thing, so phase 1 of a study may run without a
        lever and phase 2 with it in one results dir. ``leave_out``: the dotted keys left out besides output_dir,
        serve and tracking (scripts/rehash_results.py computes the older hash, which left out only
        ``train.checkpoint_every_min``). Raises DataError when the data files cannot be read."""
        from lorastudy.data import data_fingerprint

        d = self.resolved()
        d.pop("output_dir", None)
        d.pop("serve", None)  # benchmark knobs do not change trained models
        d["data"]["source"] = data_fingerprint(self)
        d.pop("tracking", None)  # nor does where runs are also logged
        for key in leave_out:  # nor how runs are executed (each run's metrics.json records it)
            *parents, leaf = key.split(".")
            node = d
            for part in parents:
                node = node.get(part, {})
            node.pop(leaf, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class HParamValues(_Strict):
    """The hyperparameters of one run (``training.HParams``), validated with the same ranges as the config: values
    from the config, a ``best.yaml`` or ``--set hp.NAME=value`` all pass here."""

    lr: PositiveFloat
    batch_size: PositiveInt
    epochs: PositiveFloat
    warmup_ratio: float = Field(ge=0, le=1)
    weight_decay: float = Field(ge=0)
    lora_alpha: PositiveFloat
    lora_dropout: float = Field(ge=0, lt=1)
    max_steps: PositiveInt | None = None


def validate_hparams(values: dict[str, Any], where: str = "hyperparameters") -> dict[str, Any]:
    """``values`` checked and converted (e.g. ``epochs`` 3 -> 3.0; ``batch_size`` 2.5 is refused, never cut to 2).
    Raises ConfigError naming each bad field as ``hp.NAME`` and the value given."""
    known = list(HParamValues.model_fields)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown hyperparameter(s) {', '.join('hp.' + k for k in unknown)}; "
                          f"known: {', '.join(known)}")
    try:
        return HParamValues.model_validate(values).model_dump()
    except ValidationError as e:
        raise ConfigError(_format_validation(e, where, prefix="hp.")) from None


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
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: the key must be a dotted name like train.batch_size, got {key!r}")
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


def _format_validation(err: ValidationError, where: str, prefix: str = "") -> str:
    lines = [f"{where}: invalid configuration"]
    for e in err.errors():
        loc = prefix + ".".join(str(p) for p in e["loc"]) or "(top level)"
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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: StudyConfig, b: StudyConfig, labels: tuple[str, str] = ("given", "recorded"),
                       ignore: tuple[str, ...] = ("output_dir",)) -> list[str]:
    """Dotted keys whose resolved values differ between two configs, as 'key: <label a> X, <label b> Y' lines
    (sorted), leaving out the keys in ``ignore`` and everything under them; empty when they agree."""
    fa, fb = _flat(a.resolved()), _flat(b.resolved())
    return [f"{k}: {labels[0]} {fa.get(k)!r}, {labels[1]} {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
            if not any(k == f or k.startswith(f"{f}.") for f in ignore) and fa.get(k) != fb.get(k)]


def dump_yaml(cfg: StudyConfig) -> str:
    return yaml.safe_dump(cfg.resolved(), sort_keys=False)
