import pytest
import torch

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


def test_hash_leaves_out_how_runs_are_executed_but_not_what_they_compute():
    """EXECUTION_KEYS (step path, fusion, levers, compile options, checkpoint interval) do not enter the hash, so a
    phase may switch a lever on in a results dir whose earlier phases ran without it; what runs compute does."""
    from lorastudy.config import EXECUTION_KEYS

    base = StudyConfig().hash()
    other = {"fast_step": "eager", "fuse": "off", "fuse_max_runs": 8, "fuse_optimizer": "torch",
             "step_levers": ["fused_kernels"], "compile_mode": "max-autotune-no-cudagraphs", "compile_dynamic": True,
             "compile_cache_dir": "elsewhere", "checkpoint_every_min": 1.0}
    assert sorted(f"train.{k}" for k in other) == sorted(EXECUTION_KEYS)
    for key, value in other.items():
        assert StudyConfig(train={key: value}).hash() == base, key
    for key, value in {"max_grad_norm": 1.0, "precision": "fp32", "patience": 5, "device": "cpu",
                       "eval_batch_size": 8}.items():
        assert StudyConfig(train={key: value}).hash() != base, key


# -- values and their ranges ------------------------------------------------------------------------------------------
def _numeric_leaves(model, prefix=""):
    """(dotted field, constrained?) for every int/float in the config schema, inside dicts, lists and Optionals."""
    import typing

    from pydantic import BaseModel

    def constrained(meta) -> bool:
        return any(type(m).__name__ in ("Gt", "Ge", "Lt", "Le", "Interval", "MultipleOf") for m in meta) or any(
            constrained(getattr(m, "metadata", [])) for m in meta)

    def walk(tp, meta, name):
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            base, *extra = typing.get_args(tp)
            yield from walk(base, [*meta, *extra], name)
        elif origin in (typing.Union, __import__("types").UnionType) or origin in (list, dict):
            for a in typing.get_args(tp):
                yield from walk(a, meta, name + ("[]" if origin in (list, dict) else ""))
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ not in ("FloatRange", "IntRange"):  # search ranges: bounded per hyperparameter, below
                for f, info in tp.model_fields.items():
                    yield from walk(info.annotation, list(info.metadata), f"{name}.{f}")
        elif tp in (int, float):
            yield name, constrained(meta)

    for f, info in model.model_fields.items():
        yield from walk(info.annotation, list(info.metadata), prefix + f)


def test_every_numeric_field_has_a_range():
    leaves = list(_numeric_leaves(StudyConfig))
    assert len(leaves) > 40
    assert [name for name, ok in leaves if not ok] == []


@pytest.mark.parametrize("override, field", [
    ("train.lr.full=-1", "train.lr.full"),
    ("sanity.lr.lora=0", "sanity.lr.lora"),
    ("train.epochs=.nan", "train.epochs"),
    ("seeds=[1, -2]", "seeds.1"),
    ("data.train_limit.sst2=0", "data.train_limit.sst2"),
    ("drift.h1b_min_reduction=1.5", "drift.h1b_min_reduction"),
    ("serve.batch_sizes=[0]", "serve.batch_sizes.0"),
    ("search.spaces.full.lr={low: 0, high: 1.0e-3}", "search.spaces.full.lr"),
    ("search.spaces.lora.lora_dropout.high=1.0", "search.spaces.lora.lora_dropout"),
    ("search.spaces.full.warmup_ratio.high=1.5", "search.spaces.full.warmup_ratio"),
    ("search.spaces.full.weight_decay.low=-0.1", "search.spaces.full.weight_decay"),
    ("search.spaces.full.epochs.low=0", "search.spaces.full.epochs"),
    ("data.pair_template='{a} and {c}'", "data.pair_template"),
    ("data.normalize_text=lower", "data.normalize_text"),
    # booleans are not numbers (pydantic's lax mode read true as 1: one epoch)
    ("train.epochs=true", "train.epochs"),
    ("seeds=[1, true]", "seeds"),
    ("serve.batch_sizes=[false]", "serve.batch_sizes"),
    ("data.train_limit.sst2=true", "data.train_limit"),
])
def test_out_of_range_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert f"field {field}:" in str(e.value)


def test_defaults_are_validated_and_hparams_not_cast():
    from lorastudy.config import validate_hparams
    from lorastudy.training import HParams

    cfg = load_config(None)
    assert isinstance(cfg.train.epochs, float)
    assert HParams.from_config(cfg, "full", {"epochs": 2.5}).epochs == 2.5  # was cast to int(2.5) = 2
    with pytest.raises(ConfigError, match=r"hp\.batch_size"):
        HParams.from_config(cfg, "full", {"batch_size": 2.5})
    with pytest.raises(ConfigError, match=r"hp\.lr.*greater than 0"):
        HParams.from_config(cfg, "lora", {"lr": -1})
    with pytest.raises(ConfigError, match=r"hp\.epochs.*not a boolean"):
        HParams.from_config(cfg, "full", {"epochs": True})
    with pytest.raises(ConfigError, match=r"hp\.lr_max"):
        HParams.from_config(cfg, "lora", {"lr_max": 1})
    assert validate_hparams({**vars(HParams.from_config(cfg, "lora")), "lora_dropout": 0.1})["lora_dropout"] == 0.1


def test_cli_refuses_out_of_range_values_with_exit_2():
    from typer.testing import CliRunner

    from lorastudy.cli import app

    r = CliRunner().invoke(app, ["config", "show", str(REPO / "configs" / "tiny.yaml"), "--set", "train.lr.full=-1"])
    assert r.exit_code == 2 and "train.lr.full" in r.output
    r = CliRunner().invoke(app, ["train", str(REPO / "configs" / "tiny.yaml"), "--task", "rte", "--method", "lora",
                                 "--set", "hp.lr=-1"])
    assert r.exit_code == 2 and "hp.lr" in r.output and "Traceback" not in r.output


def test_cli_refuses_bad_method_seed_and_workers_with_exit_2(tmp_path, glue_dir):
    """Each used to run into a traceback (tune --method dora: KeyError; train --seed -1: numpy's ValueError;
    extract --batch-size -3: AttributeError) or be taken silently (--workers 0 or -1 ran as 1 worker, extract
    --batch-size 0 as the config's batch size)."""
    from typer.testing import CliRunner

    from lorastudy.cli import app

    tiny, out = str(REPO / "configs" / "tiny.yaml"), f"output_dir={tmp_path / 'out'}"
    for args, named in ((["tune", tiny, "--method", "dora"], "--method 'dora'"),
                        (["train", tiny, "--task", "rte", "--method", "lora", "--seed", "-1"], "--seed"),
                        (["train", tiny, "--task", "rte", "--method", "lora", "--seed", str(2**32)], "--seed"),
                        (["tune", tiny, "--workers", "0"], "--workers"),
                        (["train-all", tiny, "--workers", "-1"], "--workers"),
                        (["run", tiny, "--workers", "0"], "--workers"),
                        (["extract", tiny, "--batch-size", "-3"], "--batch-size"),
                        (["extract", tiny, "--batch-size", "0"], "--batch-size"),
                        # a lever that needs CUDA, on a CPU-only machine: refused before anything runs
                        *([(["train-all", tiny, "--set", "train.step_levers=[fused_kernels]", "--set",
                             "train.fast_step=static"], "train.step_levers"),
                           (["run", tiny, "--set", "train.step_levers=[fused_kernels]", "--set", "train.fuse=on"],
                            "train.step_levers")]
                          if not torch.cuda.is_available() else [])):
        r = CliRunner().invoke(app, [*args, "--set", out, "--data-dir", str(glue_dir)])
        assert r.exit_code == 2 and named in r.output, (args, r.output)
        assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, (args, r.output)
    assert not (tmp_path / "out").exists()


def test_a_cuda_lever_is_refused_only_where_a_levered_step_would_run_on_the_cpu():
    """The eager path ignores step levers (fast_step eager, or auto on a CPU): no refusal there; the static and
    fused steps apply them, so a lever that needs CUDA is refused where they would run on the CPU."""
    from lorastudy.cli import _check_levers_here

    if torch.cuda.is_available():
        pytest.skip("checks what a CPU-only machine refuses")
    lever = "train.step_levers=[fused_kernels]"
    for ok in ([], ["train.fast_step=eager"], ["train.fuse=off"]):
        _check_levers_here(load_config(REPO / "configs" / "tiny.yaml", [lever, *ok]))  # auto on a CPU: eager
    for bad in (["train.fast_step=static"], ["train.fuse=on"]):
        with pytest.raises(ConfigError, match="need a CUDA device"):
            _check_levers_here(load_config(REPO / "configs" / "tiny.yaml", [lever, *bad]))
    # the Triton optimizer pass of fused groups (train.fuse_optimizer=triton) runs on CUDA only, outside tests
    triton = "train.fuse_optimizer=triton"
    _check_levers_here(load_config(REPO / "configs" / "tiny.yaml", [triton]))  # auto on a CPU: no fused groups
    with pytest.raises(ConfigError, match="fuse_optimizer=triton: .*cannot run on cpu"):
        _check_levers_here(load_config(REPO / "configs" / "tiny.yaml", [triton, "train.fuse=on"]))


def test_cli_refuses_unclear_overrides_and_run_options_with_exit_2(tmp_path):
    """--set with an empty key (or an empty part of a dotted key) was reported as "field (top level): unknown key";
    --only with --from ran --only and ignored --from; a time budget <= 0 exited 0 having run nothing; config show
    printed a whole config before an error about its data; an empty name or output_dir wrote into results/ itself
    or the current directory."""
    from typer.testing import CliRunner

    from lorastudy.cli import app

    tiny = str(REPO / "configs" / "tiny.yaml")
    for bad in ("=3", "train..lr=1", ".seeds=[1]", "train.=1"):
        r = CliRunner().invoke(app, ["config", "show", tiny, "--set", bad])
        assert r.exit_code == 2 and f"--set {bad!r}" in r.output and "dotted name" in r.output, (bad, r.output)
    out = f"output_dir={tmp_path / 'out'}"
    for args, named in ((["--only", "report", "--from", "drift"], "--only report and --from drift"),
                        (["--time-budget", "-5"], "--time-budget -5"), (["--time-budget", "0"], "--time-budget 0")):
        r = CliRunner().invoke(app, ["run", tiny, *args, "--set", out])
        assert r.exit_code == 2 and named in r.output, (args, r.output)
    assert not (tmp_path / "out").exists()
    for empty in ("name", "output_dir"):  # results/ itself, or the current directory
        r = CliRunner().invoke(app, ["config", "show", tiny, "--set", f"{empty}="])
        assert r.exit_code == 2 and f"field {empty}: String should have at least 1 character" in r.output, r.output
    r = CliRunner().invoke(app, ["config", "show", tiny, "--set", f"data.source={tmp_path / 'nothing'}"])
    assert r.exit_code == 2 and "neither 'hub' nor an existing directory" in r.output
    assert "output_dir" not in r.output, r.output


# -- identity: the data by content ------------------------------------------------------------------------------------
@pytest.fixture
def two_copies(tmp_path, glue_dir):
    """Two directories with the same RTE files, and a third whose validation file differs by one row."""
    import shutil

    import pandas as pd

    dirs = [tmp_path / n for n in ("a", "b", "c")]
    for d in dirs:
        shutil.copytree(glue_dir / "rte", d / "rte")
    pd.read_parquet(dirs[2] / "rte" / "validation.parquet").iloc[:-1].to_parquet(dirs[2] / "rte" / "validation.parquet")
    return dirs


def test_hash_follows_data_content_not_its_path(two_copies, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from lorastudy.cli import app
    from lorastudy.data import data_identity

    a, b, c = two_copies
    tiny, sets = str(REPO / "configs" / "tiny.yaml"), ["--set", "tasks=[rte]"]

    def shown(*args):
        r = CliRunner().invoke(app, ["config", "show", tiny, *sets, *args])
        assert r.exit_code == 0, r.output
        return r.output.split("# config hash: ")[1].split()[0]

    monkeypatch.delenv("LORASTUDY_GLUE_DIR", raising=False)
    by_dir, by_set = shown("--data-dir", str(a)), shown("--set", f"data.source={a}")
    monkeypatch.setenv("LORASTUDY_GLUE_DIR", str(a))
    by_env = shown()
    assert by_dir == by_set == by_env
    monkeypatch.chdir(tmp_path)
    assert shown("--data-dir", "b") == by_dir  # another path (relative) to the same bytes
    assert shown("--data-dir", str(c)) != by_dir  # other data
    monkeypatch.delenv("LORASTUDY_GLUE_DIR")
    assert shown() != by_dir  # hub
    ident = data_identity(load_config(tiny, ["tasks=[rte]", f"data.source={a}"]))
    assert ident["rte"]["source"] == "local" and ident["rte"]["files"]["train"]["name"] == "rte/train.parquet"
    assert len(ident["rte"]["files"]["validation"]["sha256"]) == 64 and str(a) not in str(ident)
    assert ident["rte"]["rows"] == {"train": 64, "validation": 32, "test": 48, "probe": 40}


def test_manifest_records_the_data_identity(tiny_cfg):
    import json

    from lorastudy import store
    from lorastudy.data import data_identity

    store.check_manifest(tiny_cfg)
    man = json.loads((tiny_cfg.out / "manifest.json").read_text())
    assert man["data"] == json.loads(json.dumps(data_identity(tiny_cfg)))
    assert set(man["data"]) == set(tiny_cfg.tasks) and man["config_hash"] == tiny_cfg.hash()
