import numpy as np
import pandas as pd
import pytest

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy.config import DataConfig, load_config
from lorastudy.tasks import builtin_tasks
from tests.conftest import REPO

SIZES = {"sst2": (67349, 872), "mrpc": (3668, 408), "rte": (2490, 277)}
# GLUE-train rows whose text occurs more than once in GLUE train: never carved out into validation (a plain carve-out
# put 20 copies of train rows into SST-2's validation, 2 into RTE's)
REPEATED = {"sst2": 742, "mrpc": 0, "rte": 4}


@pytest.fixture(scope="module")
def real_splits(glue_dir):
    return {t: D.load_splits(t, str(glue_dir)) for t in SIZES}


@pytest.mark.parametrize("task", list(SIZES))
def test_real_glue_splits(real_splits, task):
    s = real_splits[task]
    n_train, n_test = SIZES[task]
    assert s.kept_in_train == {"repeated_in_train": REPEATED[task], "in_test": 0}
    assert len(s.train) + len(s.validation) == n_train
    assert len(s.validation) == min(round(0.1 * n_train), 2000)
    assert len(s.test) == n_test
    # after the drop no pair of splits shares a text (every pair, probe included, is checked)
    probe = D.probe_set(s, 750)
    found = D.split_overlaps(s, probe, builtin_tasks()[task])
    assert set(found) == {"train~validation", "train~test", "train~probe", "validation~test", "validation~probe",
                          "test~probe"}
    assert all(v["rows"] == 0 for v in found.values()), found
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
    enc = D.encode(tok, df, spec, DataConfig(max_length=32))
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


def test_overlaps_cover_every_pair_of_splits():
    """Copies are found between every pair of splits, never counting a probe row against its own source row."""
    spec = builtin_tasks()["sst2"]
    train = pd.DataFrame({"sentence": ["a", "b", "c "], "label": [0, 1, 0], "idx": [0, 1, 2]})
    val = pd.DataFrame({"sentence": ["c", "d", "e"], "label": [0, 1, 1], "idx": [3, 4, 5]})
    test = pd.DataFrame({"sentence": ["a", "e", "f"], "label": [0, 1, 1], "idx": [0, 1, 2]})
    probe = pd.concat([test.assign(probe_id=[f"test:{i}" for i in test["idx"]]),
                       val.iloc[[1]].assign(probe_id=["validation:4"])], ignore_index=True)
    got = D.overlaps({"train": train, "validation": val, "test": test, "probe": probe}, spec)
    assert {k: v["rows"] for k, v in got.items()} == {
        "train~validation": 1, "train~test": 1, "train~probe": 1, "validation~test": 1, "validation~probe": 1,
        "test~probe": 0}
    assert got["train~validation"]["examples"] == ["validation:3"]


def test_validation_never_holds_copies_of_train_or_test_rows(tmp_path):
    train = pd.DataFrame({"sentence": [f"s{i}" for i in range(20)] + ["dup "] * 10 + [" dup"] * 10,
                          "label": [0, 1] * 20})
    _write(tmp_path / "sst2", "train.parquet", train)
    _write(tmp_path / "sst2", "validation.parquet", pd.DataFrame({"sentence": ["s0", "t"], "label": [0, 1]}))
    s = D.load_splits("sst2", str(tmp_path), validation_fraction=0.45)
    assert s.kept_in_train == {"repeated_in_train": 20, "in_test": 1}
    assert len(s.validation) == 18 and s.validation["label"].sum() == 9  # full size, stratified
    assert not {"dup ", " dup", "s0"} & set(s.validation["sentence"])  # copies of train rows / of a test row


def test_stray_tab_in_tsv_names_file_and_line(tmp_path):
    d = tmp_path / "SST-2"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\na fine film\t1\na dull\tfilm\t0\n")
    (d / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(D.DataError, match=r"SST-2/train\.tsv, line 3: 3 tab-separated fields .* header has 2"):
        D.load_raw("sst2", str(tmp_path))
    (d / "train.tsv").write_bytes(b"sentence\tlabel\na fine film\t1\n\xff\xfe bad\t0\n")
    with pytest.raises(D.DataError, match=r"train\.tsv, line 3: not UTF-8"):
        D.load_raw("sst2", str(tmp_path))
    (d / "train.tsv").write_text("")
    with pytest.raises(D.DataError, match=r"train\.tsv: empty file"):
        D.load_raw("sst2", str(tmp_path))


@pytest.fixture
def good_parquet(tmp_path):
    df = pd.DataFrame({"sentence": [f"text {i}" for i in range(200)], "label": [0, 1] * 100})
    _write(tmp_path / "sst2", "train.parquet", df)
    _write(tmp_path / "sst2", "validation.parquet", df.iloc[:20])
    return tmp_path / "sst2" / "train.parquet"


@pytest.mark.parametrize("damage", ["empty", "truncated", "corrupted"])
def test_unreadable_parquet_names_path_and_cause(good_parquet, damage):
    data = good_parquet.read_bytes()
    if damage == "empty":
        data = b""
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:  # bytes flipped in the middle, the footer intact
        mid = len(data) // 2
        data = data[:mid - 200] + bytes(b ^ 0xFF for b in data[mid - 200: mid + 200]) + data[mid + 200:]
    good_parquet.write_bytes(data)
    with pytest.raises(D.DataError, match=r"train\.parquet: cannot read this parquet file \(\w+"):
        D.load_raw("sst2", str(good_parquet.parent.parent))


def test_bad_files_exit_2_with_the_file_named(tmp_path, good_parquet):
    from typer.testing import CliRunner

    from lorastudy.cli import app

    good_parquet.write_bytes(good_parquet.read_bytes()[:100])
    r = CliRunner().invoke(app, ["data-stats", str(REPO / "configs" / "tiny.yaml"), "--data-dir",
                                 str(good_parquet.parent.parent), "--set", "tasks=[sst2]",
                                 "--set", f"output_dir={tmp_path / 'out'}"])
    assert r.exit_code == 2, r.output
    assert "train.parquet: cannot read" in " ".join(r.output.split()) and "Traceback" not in r.output


def test_data_stats_shows_copies_and_layout(tmp_path, glue_dir):
    from typer.testing import CliRunner

    from lorastudy.cli import app

    r = CliRunner().invoke(app, ["data-stats", str(REPO / "configs" / "tiny.yaml"), "--data-dir", str(glue_dir),
                                 "--set", "tasks=[rte]", "--set", f"output_dir={tmp_path}"])
    assert r.exit_code == 0, r.output
    assert "train ~ validation" in r.output and "<s>{a}</s>{b}" in r.output
    import json

    st = json.loads((tmp_path / "data_stats.json").read_text())
    assert st["rte"]["kept_in_train"] == {"repeated_in_train": 4, "in_test": 0}
    assert set(st["rte"]["overlaps"]) == {"train~validation", "train~test", "train~probe", "validation~test",
                                          "validation~probe", "test~probe"}


# -- the input encoding: pair template, truncation, normalisation -----------------------------------------------------
def test_text_template_truncates_segments_never_the_separator():
    tok = M.tiny_tokenizer()
    spec = builtin_tasks()["rte"]
    df = pd.DataFrame({"sentence1": ["x" * 100, "ab", "x" * 7], "sentence2": ["y" * 5, "y" * 100, "y" * 100],
                       "label": [0, 1, 0]})
    data = DataConfig(max_length=24, pair_template="P: {a} | H: {b}.")
    lay = D.layout(tok, True, data.pair_template)
    enc = D.encode(tok, df, spec, data)
    sep = tok(" | H: ", add_special_tokens=False)["input_ids"]
    for ids in enc.input_ids:
        assert len(ids) == 24 and ids[:len(lay.prefix)] == lay.prefix and ids[-len(lay.suffix):] == lay.suffix
        body = ids[len(lay.prefix): len(ids) - len(lay.suffix)]
        cut = next(i for i in range(len(body)) if body[i:i + len(sep)] == sep)
        a, b = body[:cut], body[cut + len(sep):]
        assert a and b and len(a) + len(b) == 24 - len(lay.prefix) - len(lay.suffix) - len(sep)
    # longest first: the longer segment gives up tokens first; the shorter keeps all it has (or half the room)
    budget = 24 - len(lay.prefix) - len(lay.suffix) - len(sep)
    assert budget == 13
    assert [D._longest_first(100, 5, budget), D._longest_first(2, 100, budget), D._longest_first(7, 100, budget)] \
        == [(budget - 5, 5), (2, budget - 2), (budget // 2, budget - budget // 2)]
    assert enc.n_truncated == 3
    with pytest.raises(ValueError, match="nothing between"):
        DataConfig(pair_template="{a}{b}")
    with pytest.raises(D.DataError, match="no room for text"):
        D.encode(tok, df, spec, DataConfig(max_length=8, pair_template="premise {a} hypothesis {b}"))


@pytest.fixture(scope="module")
def smol():
    cfg = load_config(None, ["model.source=smollm2-135m"])
    return cfg, M.load_tokenizer(cfg.model)


PAIRS = pd.DataFrame({"sentence1": ["He left.", "The cat sat on the mat"],
                      "sentence2": ["She stayed.", "a dog barked"], "label": [0, 1]})


@pytest.mark.slow
def test_smollm2_pair_shows_the_boundary(smol):
    """SmolLM2's own pair encoding glues the segments ("He left.She stayed."): the default template separates
    them with a newline, and the second segment starts as at the start of a text."""
    cfg, tok = smol
    spec = builtin_tasks()["rte"]
    assert tok.decode(tok("He left.", "She stayed.")["input_ids"]) == "He left.She stayed."  # the tokenizer's own
    assert D.resolve_pair_template(tok, cfg.data.pair_template) == D.PAIR_SEPARATOR_TEMPLATE
    enc = D.encode(tok, PAIRS, spec, cfg.data)
    assert [tok.decode(x) for x in enc.input_ids] == ["He left.\nShe stayed.", "The cat sat on the mat\na dog barked"]
    assert enc.input_ids[1][-4:] == tok("a dog barked", add_special_tokens=False)["input_ids"]
    assert D.input_format(tok, cfg.data, spec)["layout"] == "{a}\n{b}"


@pytest.mark.slow
def test_smollm2_pair_truncation_per_segment(smol):
    cfg, tok = smol
    spec = builtin_tasks()["rte"]
    long1, long2 = " ".join(["alpha"] * 60), " ".join(["beta"] * 10)
    df = pd.DataFrame({"sentence1": [long1, "short one."], "sentence2": [long2, " ".join(["gamma"] * 60)],
                       "label": [0, 1]})
    enc = D.encode(tok, df, spec, cfg.data.model_copy(update={"max_length": 24}))
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    a_ids = tok(long1, add_special_tokens=False)["input_ids"]
    b_ids = tok(long2, add_special_tokens=False)["input_ids"]
    assert len(b_ids) == 10 and enc.n_truncated == 2
    # row 0: the first segment is cut to 24 - 1 - 10 tokens, the second kept whole, the newline kept
    assert enc.input_ids[0] == a_ids[:13] + nl + b_ids
    # row 1: the long second segment is cut; the first keeps all its tokens
    short = tok("short one.", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[1][:len(short) + 1] == short + nl and len(enc.input_ids[1]) == 24


@pytest.mark.slow
def test_smollm2_pair_left_right_padding_agree(smol):
    cfg, tok = smol
    model, _ = M.load_base(cfg.model, 2, seed=0, tokenizer=tok)
    ids = D.encode(tok, PAIRS, builtin_tasks()["rte"], cfg.data).input_ids
    import torch

    with torch.no_grad():
        r = M.classifier_logits(model.eval(), D.collate(ids, tok.pad_token_id, "right"))
        left = M.classifier_logits(model, D.collate(ids, tok.pad_token_id, "left"))
    torch.testing.assert_close(r, left, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_reads_the_last_real_token_of_sst2(smol, glue_dir):
    """Every SST-2 sentence ends with a space, a token of its own for SmolLM2: stripped (the default), no row ends
    in it; kept (normalize_text=none), every row does."""
    cfg, tok = smol
    spec = builtin_tasks()["sst2"]
    test = D.load_splits("sst2", str(glue_dir)).test.iloc[:200]
    space = tok(" ", add_special_tokens=False)["input_ids"]
    assert len(space) == 1 and test["sentence"].str.endswith(" ").all()
    last = [x[-1] for x in D.encode(tok, test, spec, cfg.data).input_ids]
    assert space[0] not in last
    raw = [x[-1] for x in D.encode(tok, test, spec, cfg.data.model_copy(update={"normalize_text": "none"})).input_ids]
    assert set(raw) == {space[0]}


def test_runs_and_extraction_record_the_resolved_template(tiny_cfg, tmp_path):
    """A run's config.yaml holds the resolved template (and reloads), its metrics the layout; the probe record of
    extraction the same layout: one encoding for every phase."""
    import json

    import yaml

    from lorastudy import representations as RP
    from lorastudy.training import HParams, run_and_save

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.source={tiny_cfg.data.source}", "tasks=[rte]",
                                                       f"output_dir={tmp_path}", "train.save_model=false",
                                                       "data.pair_template='{a} || {b}'"])
    run = tmp_path / "run"
    run_and_save(cfg, "rte", "lora", 1, HParams.from_config(cfg, "lora", {"max_steps": 2}), run)
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["data"]["pair_template"] == "{a} || {b}" and recorded["data"]["normalize_text"] == "strip"
    inputs = json.loads((run / "metrics.json").read_text())["inputs"]
    assert inputs["layout"] == "<s>{a} || {b}" and inputs["pair_template"] == "{a} || {b}"
    auto = load_config(None, ["tasks=[rte]"])
    assert auto.data.pair_template == "auto"
    resolved = D.with_resolved_inputs(auto, D.input_format(M.tiny_tokenizer(), auto.data))
    assert resolved.data.pair_template == "tokenizer"  # the tiny tokenizer puts </s> between the segments
    assert load_config(None, ["data.pair_template=tokenizer"]).data == resolved.data
    RP.extract_study(cfg, log=lambda *_: None)
    assert json.loads((tmp_path / "phase3" / "rte" / "probe.json").read_text())["inputs"] == inputs


def test_missing_task_files_name_each_file_and_directory_once(tmp_path):
    """A data dir without the task: the error lists what was looked for, each name once (was: 'train.parquet,
    train.tsv or train.tsv', the GLUE TSV name being the split's own)."""
    with pytest.raises(D.DataError) as e:
        D.data_files("sst2", str(tmp_path))
    msg = str(e.value)
    assert "no train file for task 'sst2'" in msg and "train.parquet, train.tsv in" in msg
    assert msg.count("train.tsv") == 1 and msg.count(str(tmp_path / "sst2")) == 1
