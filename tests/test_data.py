import numpy as np
import pandas as pd
import pytest

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy.tasks import builtin_tasks

SIZES = {"sst2": (67349, 872), "mrpc": (3668, 408), "rte": (2490, 277)}


@pytest.fixture(scope="module")
def real_splits(glue_dir):
    return {t: D.load_splits(t, str(glue_dir)) for t in SIZES}


@pytest.mark.parametrize("task", list(SIZES))
def test_real_glue_splits(real_splits, task):
    s = real_splits[task]
    n_train, n_test = SIZES[task]
    assert len(s.train) + len(s.validation) == n_train
    assert len(s.test) == n_test
    # disjoint: validation is carved out of GLUE train by row id
    assert not set(s.train["idx"]) & set(s.validation["idx"])
    # stratified: the validation label share matches the GLUE-train share within one example
    full = pd.concat([s.train, s.validation])
    share = full["label"].mean()
    assert abs(s.validation["label"].sum() - share * len(s.validation)) <= 1.0


def test_splits_deterministic_and_seeded(glue_dir):
    a = D.load_splits("rte", str(glue_dir))
    b = D.load_splits("rte", str(glue_dir))
    c = D.load_splits("rte", str(glue_dir), split_seed=1)
    assert a.validation["idx"].tolist() == b.validation["idx"].tolist()
    assert a.validation["idx"].tolist() != c.validation["idx"].tolist()


def test_probe_set_never_trained_on(real_splits):
    s = real_splits["rte"]
    probe = D.probe_set(s, 750)
    # RTE: all 277 test rows, then validation rows (never train)
    assert len(probe) == 277 + len(s.validation)
    assert probe["probe_id"].str.startswith("test:").sum() == 277
    val_ids = {int(p.split(":")[1]) for p in probe["probe_id"] if p.startswith("validation:")}
    assert val_ids <= set(s.validation["idx"]) and not val_ids & set(s.train["idx"])
    assert D.probe_hash(probe) == D.probe_hash(D.probe_set(s, 750))
    sst = D.probe_set(real_splits["sst2"], 750)
    assert len(sst) == 750 and sst["probe_id"].str.startswith("test:").all()


def test_limits_are_stratified_subsets(glue_dir):
    s = D.load_splits("sst2", str(glue_dir), train_limit=300, test_limit=100)
    assert len(s.train) == 300 and len(s.test) == 100
    assert abs(s.train["label"].mean() - 0.5578) < 0.01


def test_pair_tokenization_and_truncation():
    tok = M.tiny_tokenizer()
    spec = builtin_tasks()["rte"]
    df = pd.DataFrame({"sentence1": ["abc", "x" * 100], "sentence2": ["de", "y" * 100], "label": [0, 1]})
    enc = D.encode(tok, df, spec, max_length=32)
    first = enc.input_ids[0]
    # pair encoding: <s> a b c </s> d e
    assert first == [tok.bos_token_id, *tok("abc", add_special_tokens=False)["input_ids"], tok.eos_token_id,
                     *tok("de", add_special_tokens=False)["input_ids"]]
    assert len(enc.input_ids[1]) == 32 and enc.n_truncated == 1
    # longest-first truncation keeps both sentences
    assert enc.input_ids[1].count(tok.eos_token_id) == 1


def test_collate_padding_sides_give_same_positions():
    r = D.collate([[5, 6, 7], [8]], pad_id=0, padding_side="right")
    left = D.collate([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    assert r["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert r["position_ids"][1, 0] == 0 and left["position_ids"][1, 2] == 0


def test_length_grouped_order_covers_every_row_once():
    lengths = np.random.default_rng(0).integers(1, 50, 103)
    batches = D.length_grouped_order(lengths, 4, np.random.default_rng(1), mega=5)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(103))
    # within a batch lengths are close: sorted inside mega-batches
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < np.ptp(lengths) / 2


def _write(dirpath, name, df):
    dirpath.mkdir(parents=True, exist_ok=True)
    df.to_parquet(dirpath / name)


def test_bad_data_errors_name_file_row_and_problem(tmp_path):
    good = pd.DataFrame({"sentence": ["good film", "bad film", "fine"], "label": [1, 0, 1]})
    _write(tmp_path / "sst2", "train.parquet", good)
    _write(tmp_path / "sst2", "validation.parquet", good.assign(label=[1, 5, 0]))
    with pytest.raises(D.DataError, match=r"validation\.parquet, row 1: label 5 outside"):
        D.load_raw("sst2", str(tmp_path))
    _write(tmp_path / "sst2", "validation.parquet", good.assign(sentence=["ok", "  ", "x"]))
    with pytest.raises(D.DataError, match=r"row 1: empty"):
        D.load_raw("sst2", str(tmp_path))
    _write(tmp_path / "sst2", "validation.parquet", good.rename(columns={"sentence": "text"}))
    with pytest.raises(D.DataError, match=r"missing column.*sentence"):
        D.load_raw("sst2", str(tmp_path))
    with pytest.raises(D.DataError, match="no train file"):
        D.load_raw("rte", str(tmp_path))


def test_train_test_duplicates_warn(tmp_path, caplog):
    df = pd.DataFrame({"sentence": ["a film", "another", "third"], "label": [1, 0, 1]})
    _write(tmp_path / "sst2", "train.parquet", df)
    _write(tmp_path / "sst2", "validation.parquet", df.iloc[[2]])
    with caplog.at_level("WARNING"):
        D.load_splits("sst2", str(tmp_path), validation_fraction=0.3)
    assert "also occur in train" in caplog.text and "rows [0]" in caplog.text


def test_glue_tsv_directory(tmp_path):
    """The original GLUE distribution: RTE/train.tsv and RTE/dev.tsv with string labels."""
    d = tmp_path / "RTE"
    d.mkdir()
    rows = "index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man rests.\tentailment\n" \
           "1\tIt rains.\tIt is dry.\tnot_entailment\n2\tDogs bark.\tAnimals make noise.\tentailment\n"
    (d / "train.tsv").write_text(rows)
    (d / "dev.tsv").write_text(rows)
    train, test = D.load_raw("rte", str(tmp_path))
    assert train["label"].tolist() == [0, 1, 0] and train["sentence2"][1] == "It is dry."


def test_hub_source_without_datasets_says_how(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(D.DataError, match="LORASTUDY_GLUE_DIR"):
        D.load_raw("sst2", "hub")
