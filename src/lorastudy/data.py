"""GLUE data: loading (hub | local parquet/TSV dir), leak-free splits, probe set, tokenization, batching.

test = the GLUE validation split (GLUE test labels are hidden); validation = a stratified, seeded carve-out of GLUE
train, identical for every method and seed of a study; train = the rest.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lorastudy.tasks import GLUE_TSV_DIRS, TaskSpec, builtin_tasks

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad or missing data; the message names the file, the row and the problem."""


@dataclass(frozen=True)
class Splits:
    task: str
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


# -- loading ---------------------------------------------------------------------------------------------------------
def _spec(task: str | TaskSpec) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    tasks = builtin_tasks()
    if task not in tasks:
        raise DataError(f"unknown task {task!r}; built in: {sorted(tasks)} (declare others in the config)")
    return tasks[task]


def _label_to_int(value: object, spec: TaskSpec, where: str, row: int) -> int:
    if isinstance(value, str):
        v = value.strip()
        if v in spec.label_names:
            return spec.label_names.index(v)
        try:
            value = int(v)
        except ValueError:
            raise DataError(f"{where}, row {row}: label {value!r} is not one of {spec.label_names}") from None
    if pd.isna(value):
        raise DataError(f"{where}, row {row}: missing label")
    iv = int(value)
    if iv != value or not 0 <= iv < spec.num_labels:
        raise DataError(f"{where}, row {row}: label {value!r} outside the label set 0..{spec.num_labels - 1}")
    return iv


def _validate(df: pd.DataFrame, spec: TaskSpec, where: str) -> pd.DataFrame:
    missing = [c for c in [*spec.text_fields, "label"] if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; found {list(df.columns)}")
    out = pd.DataFrame({f: df[f] for f in spec.text_fields})
    for f in spec.text_fields:
        for i, v in enumerate(out[f]):
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{where}, row {i}: empty or missing text in column {f!r}")
    out["label"] = [_label_to_int(v, spec, where, i) for i, v in enumerate(df["label"])]
    # idx = row number in the source file: stable example ids across studies
    out["idx"] = np.arange(len(df), dtype=np.int64)
    return out.reset_index(drop=True)


def _read_tsv(path: Path, spec: TaskSpec) -> pd.DataFrame:
    """A GLUE-format TSV; headerless files (``spec.tsv_header`` false, e.g. CoLA) by the declared column indices."""
    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                     header=0 if spec.tsv_header else None)
    if not spec.tsv_header:
        need = [*spec.text_fields, "label"]
        width = df.shape[1]
        if any(spec.tsv_columns[f] >= width for f in need):
            raise DataError(f"{path}: {width} column(s), but tsv_columns declares "
                            f"{ {f: spec.tsv_columns[f] for f in need} } (0-based)")
        return pd.DataFrame({f: df.iloc[:, spec.tsv_columns[f]] for f in need})
    rename = {v: k for k, v in spec.tsv_columns.items()}
    return df.rename(columns=rename)


def _find(dirpath: Path, names: list[str]) -> Path | None:
    for n in names:
        p = dirpath / n
        if p.is_file():
            return p
    return None


def load_raw(task: str | TaskSpec, source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(GLUE train, GLUE validation) as validated frames with columns text fields, label, idx."""
    spec = _spec(task)
    if source == "hub":
        try:
            import datasets  # optional: pip install 'lorastudy[hub]'
        except ImportError as e:
            raise DataError(
                "data.source is 'hub' but the `datasets` package is not installed (pip install 'lorastudy[hub]'); "
                "offline, point data.source or LORASTUDY_GLUE_DIR at a local GLUE directory"
            ) from e
        name = f"{spec.hub_dataset}/{spec.hub_config or spec.name}"
        try:
            ds = datasets.load_dataset(spec.hub_dataset, spec.hub_config or spec.name)
        except Exception as e:  # network, auth, missing dataset: say which and how to go offline
            raise DataError(
                f"could not load {name} from the hub ({type(e).__name__}: {e}); offline, set data.source to a "
                "local GLUE directory (or LORASTUDY_GLUE_DIR)"
            ) from e
        return (
            _validate(ds["train"].to_pandas(), spec, f"hub:{name}/train"),
            _validate(ds["validation"].to_pandas(), spec, f"hub:{name}/validation"),
        )
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"data source {source!r} is neither 'hub' nor an existing directory")
    frames = []
    for split, tsv_name in (("train", spec.tsv_train), ("validation", spec.tsv_test)):
        candidates = [root / spec.name, root / GLUE_TSV_DIRS.get(spec.name, spec.name), root]
        path = None
        for d in candidates:
            path = _find(d, [f"{split}.parquet", f"{split}.tsv", tsv_name])
            if path:
                break
        if path is None:
            raise DataError(
                f"{root}: no {split} file for task {spec.name!r} (looked for {spec.name}/{split}.parquet, "
                f"{split}.tsv or {tsv_name} under {[str(c) for c in candidates]})"
            )
        raw = pd.read_parquet(path) if path.suffix == ".parquet" else _read_tsv(path, spec)
        frames.append(_validate(raw, spec, str(path)))
    return frames[0], frames[1]


def _text_key(df: pd.DataFrame, spec: TaskSpec) -> pd.Series:
    return df[spec.text_fields].astype(str).apply(lambda r: "\x1f".join(s.strip() for s in r), axis=1)


def check_overlap(train: pd.DataFrame, test: pd.DataFrame, spec: TaskSpec, where: str) -> list[int]:
    """Warn (naming rows) about test examples whose text also appears in train; returns the test row numbers."""
    tk = set(_text_key(train, spec))
    dup = [i for i, k in enumerate(_text_key(test, spec)) if k in tk]
    if dup:
        log.warning("%s: %d test example(s) also occur in train (test rows %s%s)", where, len(dup),
                    dup[:10], " ..." if len(dup) > 10 else "")
    return dup


# -- splitting -------------------------------------------------------------------------------------------------------
def _rng(seed: int, *salt: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(s.encode()) for s in salt)])


def stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices (sorted) of a stratified sample of size n: each class keeps its share (largest remainder)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - take))[: n - take.sum()]:
        take[j] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(chosen))


def _limit(df: pd.DataFrame, n: int | None, seed: int, *salt: str) -> pd.DataFrame:
    if n is None or n >= len(df):
        return df
    return df.iloc[stratified_sample(df["label"].to_numpy(), n, _rng(seed, *salt))].reset_index(drop=True)


_SPLITS_CACHE: dict[str, Splits] = {}


def load_splits(
    task: str | TaskSpec,
    source: str,
    *,
    split_seed: int = 0,
    validation_fraction: float = 0.1,
    validation_max: int = 2000,
    train_limit: int | None = None,
    validation_limit: int | None = None,
    test_limit: int | None = None,
) -> Splits:
    """Leak-free splits: test = GLUE validation; validation = stratified seeded carve-out of GLUE train.

    Cached per process (same arguments, same frames): the phases ask for the same splits many times."""
    spec = _spec(task)
    key = "|".join(map(str, (spec.model_dump_json(), source, split_seed, validation_fraction, validation_max,
                             train_limit, validation_limit, test_limit)))
    if key not in _SPLITS_CACHE:
        _SPLITS_CACHE[key] = _load_splits(spec, source, split_seed, validation_fraction, validation_max,
                                          train_limit, validation_limit, test_limit)
    return _SPLITS_CACHE[key]


def _load_splits(spec, source, split_seed, validation_fraction, validation_max, train_limit, validation_limit,
                 test_limit) -> Splits:
    train_all, test = load_raw(spec, source)
    check_overlap(train_all, test, spec, f"{source}:{spec.name}")
    n_val = min(int(round(validation_fraction * len(train_all))), validation_max)
    val_rows = stratified_sample(train_all["label"].to_numpy(), n_val, _rng(split_seed, spec.name, "validation"))
    mask = np.zeros(len(train_all), dtype=bool)
    mask[val_rows] = True
    validation = train_all[mask].reset_index(drop=True)
    train = train_all[~mask].reset_index(drop=True)
    return Splits(
        task=spec.name,
        train=_limit(train, train_limit, split_seed, spec.name, "train"),
        validation=_limit(validation, validation_limit, split_seed, spec.name, "vlimit"),
        test=_limit(test, test_limit, split_seed, spec.name, "test"),
    )


def splits_for(cfg, task: str) -> Splits:  # cfg: StudyConfig (not imported: avoids a cycle)
    d = cfg.data
    return load_splits(
        cfg.task(task),
        cfg.data_source(),
        split_seed=d.split_seed,
        validation_fraction=d.validation_fraction,
        validation_max=d.validation_max,
        train_limit=d.train_limit.get(task),
        validation_limit=d.validation_limit.get(task),
        test_limit=d.test_limit.get(task),
    )


def subset(df: pd.DataFrame, n: int | None, seed: int, salt: str) -> pd.DataFrame:
    """A seeded stratified subset (e.g. the SST-2 HPO training subset)."""
    return _limit(df, n, seed, salt)


def probe_set(splits: Splits, size: int) -> pd.DataFrame:
    """The fixed probe set: test rows first (all of them, in file order, if they fit; else a seeded stratified
    sample), then validation rows to fill up to ``size``. Never trained on. Adds ``probe_id`` ("test:<idx>")."""
    parts = []
    test = _limit(splits.test, size, 0, splits.task, "probe")
    parts.append(test.assign(probe_id=[f"test:{i}" for i in test["idx"]]))
    need = size - len(test)
    if need > 0:
        val = _limit(splits.validation, need, 0, splits.task, "probe-val")
        parts.append(val.assign(probe_id=[f"validation:{i}" for i in val["idx"]]))
    return pd.concat(parts, ignore_index=True)


def probe_hash(probe: pd.DataFrame) -> str:
    return hashlib.sha256("\n".join(probe["probe_id"]).encode()).hexdigest()[:16]


# -- tokenization and batching ---------------------------------------------------------------------------------------
@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: np.ndarray
    n_truncated: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids])


def encode(tokenizer, df: pd.DataFrame, spec: TaskSpec, max_length: int) -> Encoded:
    """Single sentences or the tokenizer's pair encoding, truncated to ``max_length`` (longest-first for pairs)."""
    texts = [df[f].tolist() for f in spec.text_fields]
    full = tokenizer(*texts, truncation=False, add_special_tokens=True)["input_ids"]
    enc = tokenizer(*texts, truncation="longest_first" if spec.is_pair else True, max_length=max_length)
    n_trunc = sum(len(a) > max_length for a in full)
    return Encoded(list(enc["input_ids"]), df["label"].to_numpy(dtype=np.int64), n_trunc)


def collate(seqs: list[list[int]], pad_id: int, padding_side: str = "right", pad_to: int | None = None) -> dict:
    """Dynamic padding (to the longest row, or ``pad_to``); position ids from the mask so left and right padding
    give the same positions to every real token."""
    width = max(len(s) for s in seqs) if pad_to is None else pad_to
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if padding_side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def bucket_width(longest: int, buckets: list[int] | None) -> int | None:
    """The smallest bucket that holds ``longest`` tokens (None: dynamic padding, or longer than every bucket)."""
    if not buckets:
        return None
    fits = [b for b in sorted(buckets) if b >= longest]
    return fits[0] if fits else None


def length_grouped_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, mega: int = 50) -> list:
    """Batches of similar length (less padding), in a random order: shuffle, cut into mega-batches of
    ``mega * batch_size``, sort each by length, split into batches, shuffle the batches (as HF's
    LengthGroupedSampler does)."""
    perm = rng.permutation(len(lengths))
    size = mega * batch_size
    batches = []
    for s in range(0, len(perm), size):
        chunk = perm[s: s + size]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def sequential_batches(lengths: np.ndarray, batch_size: int, sort: bool = True) -> list[np.ndarray]:
    """Evaluation batches: sorted by length for little padding (order restored by the caller)."""
    idx = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
    return [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]


def length_stats(enc: Encoded, max_length: int) -> dict:
    lens = enc.lengths()
    pct = np.percentile(lens, [50, 90, 95, 99, 100]) if len(lens) else [0] * 5
    return {
        "rows": len(enc),
        "tokens_p50": float(pct[0]), "tokens_p90": float(pct[1]), "tokens_p95": float(pct[2]),
        "tokens_p99": float(pct[3]), "tokens_max": float(pct[4]),
        "truncated": enc.n_truncated, "max_length": max_length,
    }
