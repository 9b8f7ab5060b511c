import pytest

from lorastudy.config import ConfigError, StudyConfig, load_config
from tests.conftest import REPO


@pytest.mark.parametrize("preset", ["paper", "smollm2", "quick", "tiny"])
def test_presets_load(preset):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    assert cfg.lora.rank == 8
    assert cfg.train.max_grad_norm == 0.3
    assert set(cfg.methods) == {"full", "lora"}


def test_paper_preset_is_the_protocol():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    assert cfg.model.source == "TinyLlama/TinyLlama_v1.1"
    assert cfg.data.source == "hub" and cfg.data.max_length == 384 and cfg.data.probe_size == 750
    assert cfg.seeds == [42, 1337, 2024] and cfg.search.n_trials == 15
    assert cfg.search.train_subset == {"sst2": 3000}
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    full, lora = cfg.search.spaces["full"], cfg.search.spaces["lora"]
    assert (full.lr.low, full.lr.high, full.lr.log) == (1e-6, 5e-5, True)
    assert (lora.lr.low, lora.lr.high) == (5e-5, 5e-3)
    assert (lora.lora_alpha.low, lora.lora_alpha.high) == (8, 64)
    assert full.batch_size == [1, 2, 4] and (full.epochs.low, full.epochs.high) == (2, 4)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.batch_size=3", "lora.target_modules=[q_proj]",
                                                      "search.spaces.full.lr.low=1e-7"])
    assert cfg.train.batch_size == 3
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.search.spaces["full"].lr.low == 1e-7 and cfg.search.spaces["full"].lr.high == 5e-5


@pytest.mark.parametrize(
    "text, field",
    [
        ("bogus: 1\n", "bogus"),
        ("train:\n  batch_size: many\n", "train.batch_size"),
        ("tasks: [sst2, cola]\n", "tasks"),
        ("methods: [full, qlora]\n", "methods"),
        ("search:\n  spaces:\n    full: {lr: {low: 1.0e-3, high: 1.0e-5}}\n", "search.spaces.full.lr"),
        ("lora:\n  rnk: 8\n", "lora.rnk"),
    ],
)
def test_bad_config_names_field_and_file(tmp_path, text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    assert field in str(e.value)


def test_bad_override_names_field():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.epochs=-1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["novalue"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_custom_glue_format_task(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tasks: [qnli]\ncustom_tasks:\n  qnli:\n    name: qnli\n    text_fields: [question, sentence]\n"
                 "    label_names: [entailment, not_entailment]\n")
    cfg = load_config(p)
    assert cfg.task("qnli").is_pair


def test_hash_ignores_output_dir():
    a = StudyConfig(output_dir="x")
    b = StudyConfig(output_dir="y")
    assert a.hash() == b.hash()
    assert StudyConfig(seeds=[1]).hash() != a.hash()
