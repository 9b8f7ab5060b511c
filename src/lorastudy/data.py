"""GLUE data: loading (hub | local parquet/TSV dir), leak-free splits, probe set, tokenization, batching.

test = the GLUE validation split (GLUE test labels are hidden); validation = a stratified, seeded carve-out of GLUE
train, identical for every method and seed of a study; train = the rest.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from dataclasses import dataclass, field
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
    # GLUE-train rows never carved out into validation because their text repeats in GLUE train or occurs in test:
    # {"repeated_in_train": n, "in_test": m} (they stay in train)
    kept_in_train: dict = field(default_factory=dict)

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
    """A GLUE-format TSV: one row per line, fields split on tabs, no quoting; a header line first, or, for
    headerless files (``spec.tsv_header`` false, e.g. CoLA), the columns named by their declared 0-based indices.

    Read line by line rather than with ``pandas.read_csv``: a row with a stray tab inside a sentence must be reported
    with its file and line (pandas raises a tokenizer error that names neither usefully), and a field count that
    does not match the header (or the first row) is an error, never a silently shifted column."""
    rows: list[list[str]] = []
    header: list[str] | None = None
    width: int | None = None
    lineno = 0
    try:
        with open(path, "rb") as f:  # bytes, decoded line by line: a decoding error names its line
            for lineno, raw in enumerate(f, start=1):  # noqa: B007 (lineno names the failing line below)
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("\t")
                if width is None:
                    width = len(fields)
                    if spec.tsv_header:
                        header = fields
                        continue
                if len(fields) != width:
                    what = f"the header has {width} ({', '.join(header)})" if header else f"the first row has {width}"
                    raise DataError(
                        f"{path}, line {lineno}: {len(fields)} tab-separated fields where {what}; a tab inside a "
                        "text field? Remove it (GLUE TSVs are not quoted)"
                    )
                rows.append(fields)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}, line {lineno}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if width is None:
        raise DataError(f"{path}: empty file" + (" (no header line)" if spec.tsv_header else ""))
    if not spec.tsv_header:
        need = [*spec.text_fields, "label"]
        if any(spec.tsv_columns[f] >= width for f in need):
            raise DataError(f"{path}: {width} column(s), but tsv_columns declares "
                            f"{ {f: spec.tsv_columns[f] for f in need} } (0-based)")
        return pd.DataFrame({f: [r[spec.tsv_columns[f]] for r in rows] for f in need}, dtype=object)
    df = pd.DataFrame(rows, columns=header, dtype=object)
    rename = {v: k for k, v in spec.tsv_columns.items()}
    return df.rename(columns=rename)


def _read_parquet(path: Path) -> pd.DataFrame:
    """A parquet file; any failure to read it (empty, truncated, corrupted, not parquet) is a DataError naming the
    file and pyarrow's reason."""
    try:
        return pd.read_parquet(path)
    except MemoryError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others, depending on where the file breaks
        raise DataError(f"{path}: cannot read this parquet file ({type(e).__name__}: {e}); is it empty, truncated "
                        "or corrupted? Replace it with a good copy") from None


def _read(path: Path, spec: TaskSpec) -> pd.DataFrame:
    raw = _read_parquet(path) if path.suffix == ".parquet" else _read_tsv(path, spec)
    if len(raw) == 0:
        raise DataError(f"{path}: no rows")
    return raw


def _find(dirpath: Path, names: list[str]) -> Path | None:
    for n in names:
        p = dirpath / n
        if p.is_file():
            return p
    return None


def load_raw(task: str | TaskSpec, source: str, revision: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(GLUE train, GLUE validation) as validated frames with columns text fields, label, idx. ``revision``: the hub
    dataset revision (``source == "hub"`` only). Raises DataError naming the file (and line or row) of bad data."""
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
            ds = datasets.load_dataset(spec.hub_dataset, spec.hub_config or spec.name, revision=revision)
        except Exception as e:  # network, auth, missing dataset: say which and how to go offline
            raise DataError(
                f"could not load {name} from the hub ({type(e).__name__}: {e}); offline, set data.source to a "
                "local GLUE directory (or LORASTUDY_GLUE_DIR)"
            ) from e
        return (
            _validate(ds["train"].to_pandas(), spec, f"hub:{name}/train"),
            _validate(ds["validation"].to_pandas(), spec, f"hub:{name}/validation"),
        )
    files = data_files(spec, source)
    train, validation = (_validate(_read(files[s], spec), spec, str(files[s])) for s in ("train", "validation"))
    return train, validation


def data_files(task: str | TaskSpec, source: str) -> dict[str, Path]:
    """The local files of a task: {"train": GLUE train file, "validation": GLUE validation file} (``source`` a
    directory of ``<task>/{train,validation}.parquet``, ``.tsv`` or the original GLUE TSVs). Raises DataError when
    the directory or a file is missing."""
    spec = _spec(task)
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"data source {source!r} is neither 'hub' nor an existing directory")
    out = {}
    for split, tsv_name in (("train", spec.tsv_train), ("validation", spec.tsv_test)):
        candidates = [root / spec.name, root / GLUE_TSV_DIRS.get(spec.name, spec.name), root]
        path = None
        for d in candidates:
            path = _find(d, [f"{split}.parquet", f"{split}.tsv", tsv_name])
            if path:
                break
        if path is None:
            names = list(dict.fromkeys([f"{split}.parquet", f"{split}.tsv", tsv_name]))  # train.tsv may be both
            raise DataError(
                f"{root}: no {split} file for task {spec.name!r} (looked for {', '.join(names)} in "
                f"{', '.join(dict.fromkeys(str(c) for c in candidates))})"
            )
        out[split] = path
    return out


def _text_key(df: pd.DataFrame, spec: TaskSpec) -> pd.Series:
    """One string per row: its text fields, stripped, joined by a unit separator (exact-duplicate detection)."""
    key = df[spec.text_fields[0]].astype(str).str.strip()
    for f in spec.text_fields[1:]:
        key = key + "\x1f" + df[f].astype(str).str.strip()
    return key


def _source_rows(df: pd.DataFrame, split: str) -> list[tuple[str, int]]:
    """The identity of each row as (GLUE file, row number): train and validation rows come from the GLUE train
    file, test rows from the GLUE validation file; probe rows say which in their ``probe_id``."""
    if "probe_id" in df.columns:
        return [("validation" if p.startswith("test:") else "train", int(p.split(":", 1)[1]))
                for p in df["probe_id"]]
    return [("validation" if split == "test" else "train", int(i)) for i in df["idx"]]


OVERLAP_SPLITS = ("train", "validation", "test", "probe")


def overlaps(frames: dict[str, pd.DataFrame], spec: TaskSpec) -> dict[str, dict]:
    """Exact text duplicates between every pair of splits (``frames``: split name -> frame, e.g. train,
    validation, test, probe). For a pair "a~b": ``rows`` = rows of b whose text (fields stripped) also occurs in a
    *different* example of a (the probe set is drawn from test and validation, so a probe row never counts against
    its own source row), and the first few of them (``examples``, as "b-split:idx"). Pure: no logging."""
    keys = {n: _text_key(df, spec).tolist() for n, df in frames.items()}
    ids = {n: _source_rows(df, n) for n, df in frames.items()}
    names = [n for n in OVERLAP_SPLITS if n in frames] + [n for n in frames if n not in OVERLAP_SPLITS]
    out = {}
    for i, a in enumerate(names):
        where: dict[str, set] = {}
        for k, rid in zip(keys[a], ids[a], strict=True):
            where.setdefault(k, set()).add(rid)
        for b in names[i + 1:]:
            hits = [j for j, (k, rid) in enumerate(zip(keys[b], ids[b], strict=True))
                    if k in where and where[k] - {rid}]
            out[f"{a}~{b}"] = {"rows": len(hits), "examples": [f"{b}:{frames[b]['idx'].iloc[j]}" for j in hits[:5]]}
    return out


def split_overlaps(splits: Splits, probe: pd.DataFrame, spec: TaskSpec) -> dict[str, dict]:
    """:func:`overlaps` of a task's train, validation, test and probe splits; logs a warning naming each pair that
    shares text (the validation carve-out is free of copies by construction, see ``load_splits``)."""
    out = overlaps({"train": splits.train, "validation": splits.validation, "test": splits.test, "probe": probe},
                   spec)
    for pair, v in out.items():
        if v["rows"]:
            log.warning("%s: %d %s row(s) copy the text of a %s row (e.g. %s)", splits.task, v["rows"],
                        pair.split("~")[1], pair.split("~")[0], ", ".join(v["examples"]))
    return out


def check_overlap(train_keys: pd.Series, test_keys: pd.Series, where: str) -> list[int]:
    """Warn (naming rows) about test examples whose text (``_text_key``) also appears in train; returns the test
    row numbers."""
    tk = set(train_keys)
    dup = [i for i, k in enumerate(test_keys) if k in tk]
    if dup:
        log.warning("%s: %d test example(s) also occur in train (test rows %s%s); kept: test is the official GLUE "
                    "split", where, len(dup), dup[:10], " ..." if len(dup) > 10 else "")
    return dup


# -- splitting -------------------------------------------------------------------------------------------------------
def _rng(seed: int, *salt: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(s.encode()) for s in salt)])


def stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator,
                      eligible: np.ndarray | None = None) -> np.ndarray:
    """Row indices (sorted) of a stratified sample of size n: each class keeps its share (largest remainder).
    ``eligible`` (bool per row): draw only among these rows, with the shares of all rows (a class short of eligible
    rows gives what it has)."""
    labels = np.asarray(labels)
    if n >= len(labels) and eligible is None:
        return np.arange(len(labels))
    n = min(n, len(labels))
    ok = np.ones(len(labels), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - take))[: n - take.sum()]:
        take[j] += 1
    chosen = [rng.permutation(np.flatnonzero((labels == c) & ok))[:k] for c, k in zip(classes, take, strict=True)]
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
    hub_revision: str | None = None,
) -> Splits:
    """Leak-free splits: test = GLUE validation; validation = stratified seeded carve-out of GLUE train drawn from
    rows whose text occurs once in GLUE train and not in test (``Splits.kept_in_train`` counts the others).

    Cached per process (same arguments, same frames): the phases ask for the same splits many times."""
    spec = _spec(task)
    key = "|".join(map(str, (spec.model_dump_json(), source, split_seed, validation_fraction, validation_max,
                             train_limit, validation_limit, test_limit, hub_revision)))
    if key not in _SPLITS_CACHE:
        _SPLITS_CACHE[key] = _load_splits(spec, source, split_seed, validation_fraction, validation_max,
                                          train_limit, validation_limit, test_limit, hub_revision)
    return _SPLITS_CACHE[key]


def _load_splits(spec, source, split_seed, validation_fraction, validation_max, train_limit, validation_limit,
                 test_limit, hub_revision=None) -> Splits:
    train_all, test = load_raw(spec, source, hub_revision)
    key, test_key = _text_key(train_all, spec), _text_key(test, spec)
    check_overlap(key, test_key, f"{source}:{spec.name}")
    n_val = min(int(round(validation_fraction * len(train_all))), validation_max)
    # A GLUE-train row whose text occurs again in GLUE train (SST-2 and RTE repeat sentences: a plain carve-out put
    # 20 and 2 copies of train rows into validation) or in test is never carved out: validation would score
    # memorisation, or the test set, in HPO and early stopping. Those rows stay in train (harmless there: the same
    # for every method); the official test split is unchanged.
    repeated = key.duplicated(keep=False).to_numpy()
    in_test = key.isin(set(test_key)).to_numpy()
    val_rows = stratified_sample(train_all["label"].to_numpy(), n_val, _rng(split_seed, spec.name, "validation"),
                                 eligible=~(repeated | in_test))
    mask = np.zeros(len(train_all), dtype=bool)
    mask[val_rows] = True
    validation = train_all[mask].reset_index(drop=True)
    train = train_all[~mask].reset_index(drop=True)
    kept = {"repeated_in_train": int(repeated.sum()), "in_test": int(in_test.sum())}
    return Splits(
        task=spec.name,
        train=_limit(train, train_limit, split_seed, spec.name, "train"),
        validation=_limit(validation, validation_limit, split_seed, spec.name, "vlimit"),
        test=_limit(test, test_limit, split_seed, spec.name, "test"),
        kept_in_train=kept,
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
        hub_revision=d.hub_revision,
    )


# -- data identity ---------------------------------------------------------------------------------------------------
_SHA256: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached per process by (path, size, mtime, inode): the config hash asks for it
    often, and SST-2's training file is a few MB. Raises DataError when the file cannot be read."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _SHA256:
            with open(path, "rb") as f:
                _SHA256[key] = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return _SHA256[key]


def data_fingerprint(cfg) -> dict[str, dict]:
    """What identifies the study's data, by content: per task, the sha256 of its train and validation files, or,
    for ``hub``, the dataset id and revision. Paths do not enter, so the three ways to name a directory agree.
    ``cfg``: a StudyConfig. Raises DataError when a file is missing or unreadable."""
    source = cfg.data_source()
    out = {}
    for task in cfg.tasks:
        spec = cfg.task(task)
        if source == "hub":
            out[task] = {"hub": f"{spec.hub_dataset}/{spec.hub_config or spec.name}",
                         "revision": cfg.data.hub_revision}
        else:
            out[task] = {split: file_sha256(p) for split, p in data_files(spec, source).items()}
    return out


def data_identity(cfg) -> dict[str, dict]:
    """The study's data by identity (recorded in ``results/<study>/manifest.json`` under ``"data"``), per task:
    ``source`` ("local" or "hub"); ``files`` (split -> name relative to the data directory, sha256, bytes) or
    ``dataset`` and ``revision``; ``rows`` per split (GLUE's files, then train / validation / test / probe as the
    study uses them); ``kept_in_train`` (GLUE-train rows never carved out into validation: their text repeats in
    train or occurs in test); ``overlaps`` (see :func:`overlaps`). ``cfg``: a StudyConfig. Loads the splits (cached
    per process). Raises DataError."""
    source = cfg.data_source()
    fp = data_fingerprint(cfg)
    out = {}
    for task in cfg.tasks:
        spec = cfg.task(task)
        if source == "hub":
            ident: dict = {"source": "hub", "dataset": fp[task]["hub"], "revision": cfg.data.hub_revision}
        else:
            root = Path(source)
            ident = {"source": "local", "files": {
                split: {"name": p.relative_to(root).as_posix(), "sha256": fp[task][split], "bytes": p.stat().st_size}
                for split, p in data_files(spec, source).items()}}
        s = splits_for(cfg, task)
        probe = probe_set(s, cfg.data.probe_size)
        ident["rows"] = {**s.sizes(), "probe": len(probe)}
        ident["kept_in_train"] = dict(s.kept_in_train)
        ident["overlaps"] = {k: v["rows"] for k, v in split_overlaps(s, probe, spec).items()}
        out[task] = ident
    return out


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


# Pair tasks on a tokenizer whose pair encoding puts nothing between the segments (SmolLM2, most byte-level BPE
# decoder tokenizers: ("He left.", "She stayed.") -> "He left.She stayed.") are joined with this template instead: a
# newline is one token in such tokenizers, separates the segments as a line break does in pretraining text, and the
# second segment then starts like the first (no glued word).
PAIR_SEPARATOR_TEMPLATE = "{a}\n{b}"
NORMALIZE_TEXT = ("strip", "none")
_PROBE_A, _PROBE_B = "first", "second"  # detection texts: one token each in common tokenizers, any work


def parse_pair_template(template: str) -> tuple[str, str, str] | None:
    """``"auto"`` / ``"tokenizer"`` -> None; a text template with one ``{a}`` followed by one ``{b}`` and a
    non-empty separator between them -> (before, between, after). Raises ValueError otherwise."""
    if template in ("auto", "tokenizer"):
        return None
    if template.count("{a}") != 1 or template.count("{b}") != 1 or template.index("{a}") > template.index("{b}"):
        raise ValueError(f"pair template {template!r}: needs 'auto', 'tokenizer' or text with one {{a}} (first "
                         "segment) followed by one {b} (second segment)")
    before, rest = template.split("{a}")
    between, after = rest.split("{b}")
    if not between:
        raise ValueError(f"pair template {template!r}: nothing between {{a}} and {{b}}; the model could not see "
                         "where the first segment ends (e.g. '{a}\\n{b}')")
    return before, between, after


def _locate(full: list[int], *parts: list[int]) -> list[list[int]] | None:
    """Split ``full`` into [before, part1, between, part2, ..., after] where the parts occur in order."""
    out, pos = [], 0
    for part in parts:
        hit = next((i for i in range(pos, len(full) - len(part) + 1) if full[i:i + len(part)] == part), None)
        if hit is None:
            return None
        out.append(full[pos:hit])
        pos = hit + len(part)
    out.append(full[pos:])
    return out


def _special_layout(tokenizer, pair: bool) -> list[list[int]]:
    """The token ids the tokenizer itself adds around (and, for pairs, between) segments: [prefix, suffix] or
    [prefix, middle, suffix]. Found by encoding two probe texts with and without special tokens (transformers 5 has
    no public call that returns a tokenizer's template for ids)."""
    a = tokenizer(_PROBE_A, add_special_tokens=False)["input_ids"]
    b = tokenizer(_PROBE_B, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE_A, _PROBE_B)["input_ids"] if pair else tokenizer(_PROBE_A)["input_ids"]
    found = _locate(full, a, b) if pair else _locate(full, a)
    if found is None:
        raise DataError(f"cannot tell how {type(tokenizer).__name__} frames a {'pair' if pair else 'text'}: its "
                        "encoding does not contain the segments' own tokens; set data.pair_template to a text "
                        "template such as '{a}\\n{b}'")
    return found


@dataclass(frozen=True)
class Layout:
    """How segments become one input: ``prefix + seg1 (+ middle + seg2) + suffix``; ``template`` is the resolved
    ``data.pair_template`` ("tokenizer" or a text template; "" for single-segment tasks), ``shown`` the same thing
    readable, special tokens included (e.g. ``<s>{a}</s>{b}``)."""

    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    template: str
    shown: str


def resolve_pair_template(tokenizer, template: str = "auto") -> str:
    """``auto`` -> ``tokenizer`` when the tokenizer's own pair encoding puts at least one token between the
    segments (Llama/TinyLlama: BOS), else :data:`PAIR_SEPARATOR_TEMPLATE`; other values are returned as given."""
    if template != "auto":
        return template
    _, middle, _ = _special_layout(tokenizer, pair=True)
    return "tokenizer" if middle else PAIR_SEPARATOR_TEMPLATE


def layout(tokenizer, pair: bool, template: str = "auto") -> Layout:
    """The :class:`Layout` of single-segment (``pair=False``) or pair inputs for ``tokenizer`` and
    ``data.pair_template``. Template text is tokenized on its own, like each segment, so truncation works on
    segment tokens and never cuts the separator."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    prefix, suffix = _special_layout(tokenizer, pair=False)
    if not pair:
        return Layout(prefix, [], suffix, "", text(prefix) + "{a}" + text(suffix))
    resolved = resolve_pair_template(tokenizer, template)
    if resolved == "tokenizer":
        prefix, middle, suffix = _special_layout(tokenizer, pair=True)
    else:
        before, between, after = parse_pair_template(resolved)

        def ids(t: str) -> list[int]:
            return tokenizer(t, add_special_tokens=False)["input_ids"] if t else []

        prefix, middle, suffix = prefix + ids(before), ids(between), ids(after) + suffix
    return Layout(prefix, middle, suffix, resolved, text(prefix) + "{a}" + text(middle) + "{b}" + text(suffix))


def normalize_texts(texts: list[str], mode: str) -> list[str]:
    """``data.normalize_text``: ``strip`` removes surrounding whitespace (every SST-2 sentence ends with a space that
    byte-level BPE tokenizers encode as a token of its own, so the classifier would read that same token for every
    example); ``none`` keeps the text as stored."""
    if mode == "strip":
        return [t.strip() for t in texts]
    if mode == "none":
        return list(texts)
    raise ValueError(f"normalize_text must be one of {NORMALIZE_TEXT}, got {mode!r}")


def input_format(tokenizer, data, spec: TaskSpec | None = None) -> dict[str, str]:
    """What :func:`encode` does with text, for the record (a run's metrics and config, representations metadata):
    normalisation, the resolved pair template and the layouts with the tokenizer's special tokens shown.
    ``data``: the study's DataConfig."""
    out = {"normalize_text": data.normalize_text, "single_layout": layout(tokenizer, False).shown}
    pair = layout(tokenizer, True, data.pair_template)
    out.update(pair_template=pair.template, pair_layout=pair.shown)
    if spec is not None:
        out["layout"] = out["pair_layout"] if spec.is_pair else out["single_layout"]
    return out


def with_resolved_inputs(cfg, inputs: dict[str, str]):
    """``cfg`` (a StudyConfig) with ``data.pair_template`` replaced by the resolved template in ``inputs`` (from
    :func:`input_format`): what a run records as its config, so that it says how its inputs were built."""
    data = cfg.data.model_copy(update={"pair_template": inputs["pair_template"]})
    return cfg.model_copy(update={"data": data})


def _longest_first(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Segment lengths kept when la + lb tokens must fit ``budget``: tokens are cut from the end of the longer
    segment first (as the tokenizers' ``longest_first`` strategy), so the shorter keeps all of its tokens or half
    of the budget."""
    if la + lb <= budget:
        return la, lb
    if la >= lb:
        kb = min(lb, budget // 2)
        return budget - kb, kb
    ka = min(la, budget // 2)
    return ka, budget - ka


def encode(tokenizer, df: pd.DataFrame, spec: TaskSpec, data) -> Encoded:
    """Token ids of every row of ``df``, the one encoding used by training, evaluation, extraction and serving.

    ``data``: the study's DataConfig (``cfg.data``): ``max_length``, ``normalize_text`` (applied to every text field
    first) and ``pair_template`` (see :func:`layout`). A single text: ``prefix + text + suffix`` (the tokenizer's own
    special tokens), truncated from the end. A pair: ``prefix + first + middle + second + suffix`` with
    longest-first truncation of the two segments only: the separator is never cut. Raises DataError when
    ``max_length`` leaves no room for text."""
    if not hasattr(data, "max_length"):
        raise TypeError("encode() takes the study's data config (cfg.data), not a bare max_length: the text "
                        "normalisation and pair template must be the same in every phase")
    L = data.max_length
    labels = df["label"].to_numpy(dtype=np.int64)
    lay = layout(tokenizer, spec.is_pair, data.pair_template)
    budget = L - len(lay.prefix) - len(lay.middle) - len(lay.suffix)
    if budget < len(spec.text_fields):
        raise DataError(f"data.max_length={L} leaves no room for text: the input template "
                        f"{lay.shown!r} takes {L - budget} tokens")
    if len(df) == 0:
        return Encoded([], labels, 0)
    segs = [tokenizer(normalize_texts(df[f].astype(str).tolist(), data.normalize_text),
                      add_special_tokens=False)["input_ids"] for f in spec.text_fields]
    out, n_trunc = [], 0
    if spec.is_pair:
        for a, b in zip(segs[0], segs[1], strict=True):
            ka, kb = _longest_first(len(a), len(b), budget)
            n_trunc += ka + kb < len(a) + len(b)
            out.append(lay.prefix + a[:ka] + lay.middle + b[:kb] + lay.suffix)
    else:
        for a in segs[0]:
            n_trunc += len(a) > budget
            out.append(lay.prefix + a[:budget] + lay.suffix)
    return Encoded(out, labels, n_trunc)


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
