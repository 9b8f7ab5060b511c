"""Fused multi-run training (fused.py) computes, per run, what the run computes trained alone.

CPU, fp32, the tiny model: the fused group runs its static code without graph capture (``train.fuse=on``) and is
compared with each run trained alone on the static path (``train.fast_step=static``: the same bucket padding,
filler rows, 4-D mask and fused RMSNorm). On a GPU, ``test_cuda_graph_fused_matches_static`` compares graph replay
with the static code (benchmarks/gpu/fused.sh runs it first).
"""

import json

import numpy as np
import pytest
import torch

from lorastudy import data as D
from lorastudy import fused
from lorastudy import modeling as M
from lorastudy.config import ConfigError, load_config
from lorastudy.execution import Context, PlannedRun, plan_groups, resolve_device
from lorastudy.training import HParams, TrainingError, train_run
from tests.conftest import REPO

REL = 1e-5


def _cfg(tiny_cfg, *sets):
    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"data.source={tiny_cfg.data.source}", f"output_dir={tiny_cfg.output_dir}",
                        "train.fast_step=static", *sets])


def _hp(cfg, method, **kw):
    return HParams.from_config(cfg, method, {"lora_dropout": 0.0, **kw})


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _same_run(alone: dict, group: dict) -> None:
    assert group["steps"] == alone["steps"] and group["best_step"] == alone["best_step"]
    assert group["stopped_early"] == alone["stopped_early"]
    assert len(group["curve"]) == len(alone["curve"])
    for a, b in zip(alone["curve"], group["curve"], strict=True):
        assert a["step"] == b["step"] and a["lr"] == pytest.approx(b["lr"], rel=1e-6)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=REL)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=REL)
    assert group["test_predictions"] == alone["test_predictions"]
    assert group["test"]["loss"] == pytest.approx(alone["test"]["loss"], rel=REL)
    wa, wg = _weights(alone["_model"]), _weights(group["_model"])
    assert wa.keys() == wg.keys()
    for n in wa:  # whole tensors: Adam divides by sqrt(v), so a near-zero gradient's rounding can move one weight
        assert (wa[n] - wg[n]).norm() <= REL * wa[n].norm() + 1e-7, n


@pytest.mark.parametrize("method", ["lora", "full"])
def test_triton_optimizer_matches_torch_in_bf16_with_slot_reuse(tiny_cfg, method):
    """What the fp32 tests cannot see: under bf16 autocast the kernel also writes the bf16 compute copies and reads
    bf16 matmul gradients; and with three runs in two slots the third takes a freed slot, whose optimizer state
    must start fresh. The kernel's group against the torch.optim.AdamW group, within bf16 rounding (Triton's
    interpreter truncates its casts to bf16). Runs only in the interpreter (tests/test_fused_adamw.py)."""
    from lorastudy import fused_adamw

    if not fused_adamw.available(torch.device("cpu")):
        pytest.skip("the kernel runs here only in Triton's interpreter (tests/test_fused_adamw.py)")
    specs = [{"task": "rte", "method": method, "seed": s, "keep_model": True,
              "hp": _hp(tiny_cfg, method, lr=3e-3 / (s + 1), epochs=1, batch_size=4, weight_decay=0.01 * s)}
             for s in range(3)]
    out = {opt: fused.train_runs(_cfg(tiny_cfg, "train.precision=bf16", f"train.fuse_optimizer={opt}"), specs,
                                 slots=2) for opt in ("torch", "triton")}
    for a, b in zip(out["torch"], out["triton"], strict=True):
        assert isinstance(a, dict) and isinstance(b, dict), (a, b)
        assert b["fused_optimizer"] == "triton" and a["precision"] == "bf16-autocast"
        for x, y in zip(a["curve"], b["curve"], strict=True):
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=3e-2)
        wa, wb = _weights(a["_model"]), _weights(b["_model"])
        for n in wa:
            assert (wa[n] - wb[n]).norm() <= 3e-2 * wa[n].norm() + 1e-6, n


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("optimizer", ["torch", "triton"])
def test_group_of_three_equals_the_runs_alone(tiny_cfg, method, optimizer):
    """Different seeds (two runs share one), learning rates, LoRA alphas, schedule lengths and warmups, weight
    decays, batch sizes (so batch orders): each run's losses, early-stopping step, predictions and saved weights
    are those of the run trained alone. ``triton``: the group's optimizer pass is fused_adamw's kernel (Triton's
    interpreter on CPU: tests/test_fused_adamw.py runs these cases in a child process with it on)."""
    from lorastudy import fused_adamw

    if optimizer == "triton" and not fused_adamw.available(torch.device("cpu")):
        pytest.skip("the kernel runs here only in Triton's interpreter (tests/test_fused_adamw.py)")
    cfg = _cfg(tiny_cfg, f"train.fuse_optimizer={optimizer}")
    runs = [(0, _hp(cfg, method, lr=3e-3, lora_alpha=8, epochs=2, warmup_ratio=0.1, weight_decay=0.01,
                    batch_size=4)),
            (1, _hp(cfg, method, lr=8e-3 if method == "lora" else 2e-3, lora_alpha=32, epochs=1, warmup_ratio=0.0,
                    batch_size=3)),
            (0, _hp(cfg, method, lr=1e-3, lora_alpha=16, epochs=3, max_steps=20, warmup_ratio=0.3,
                    weight_decay=0.05, batch_size=4))]
    specs = [{"task": "rte", "method": method, "seed": s, "hp": hp, "keep_model": True} for s, hp in runs]
    group = fused.train_runs(cfg, specs)
    for (seed, hp), g in zip(runs, group, strict=True):
        assert isinstance(g, dict), g
        assert g["step_mode"] == "fused-static" and g["fused_optimizer"] == optimizer
        alone = train_run(cfg, "rte", method, seed, hp, keep_model=True)
        _same_run(alone, g)
    assert len({g["total_steps_planned"] for g in group}) == 3  # three schedule lengths


def test_early_stop_and_divergence_inside_a_group(tiny_cfg):
    """A run whose validation loss stays flat stops early and one whose loss turns non-finite fails, inside the
    group; the run beside them is unaffected (equal to itself alone), as is the early stopper."""
    cfg = _cfg(tiny_cfg, "train.evals_per_epoch=4", "train.patience=3")
    flat = _hp(cfg, "full", lr=1e-30, epochs=5, warmup_ratio=0.0)  # weights never move
    boom = _hp(cfg, "full", lr=1e30, warmup_ratio=0.0)
    good = _hp(cfg, "full", lr=2e-3, epochs=2)
    specs = [{"task": "rte", "method": "full", "seed": 0, "hp": hp, "keep_model": True} for hp in (flat, boom, good)]
    res = fused.train_runs(cfg, specs)
    assert isinstance(res[1], TrainingError) and "non-finite" in str(res[1])
    assert res[0]["stopped_early"] and len(res[0]["curve"]) == 4
    _same_run(train_run(cfg, "rte", "full", 0, flat, keep_model=True), res[0])
    _same_run(train_run(cfg, "rte", "full", 0, good, keep_model=True), res[2])


def test_dropout_masks_come_from_the_run_own_generator(tiny_cfg):
    """With LoRA dropout, a run's masks come from its own generator: the same run beside other runs gives the same
    result (one bucket width and one batch size: the same draw shapes), another seed another one."""
    cfg = _cfg(tiny_cfg, "train.shape_buckets=[64]")
    hp = _hp(cfg, "lora", lr=5e-3, epochs=1, lora_dropout=0.3, batch_size=4)
    other = _hp(cfg, "lora", lr=1e-3, epochs=1, lora_dropout=0.1, batch_size=4)
    spec = lambda seed, h: {"task": "rte", "method": "lora", "seed": seed, "hp": h}  # noqa: E731
    a = fused.train_runs(cfg, [spec(0, hp), spec(1, other)])[0]
    b = fused.train_runs(cfg, [spec(2, other), spec(0, hp), spec(3, hp)])[1]
    c = fused.train_runs(cfg, [spec(5, hp)])[0]
    assert [x["train_loss"] for x in a["curve"]] == [x["train_loss"] for x in b["curve"]]
    assert a["test_predictions"] == b["test_predictions"]
    assert [x["train_loss"] for x in c["curve"]] != [x["train_loss"] for x in a["curve"]]


def test_fused_train_all_writes_what_single_runs_write_and_reloads(tiny_cfg):
    """Phase 2 with fusion: every run directory is what a single run writes (metrics.json with the same keys,
    the PEFT adapter or the full model); the artifacts reload and reproduce the predictions."""
    from lorastudy import store
    from lorastudy.pipeline import train_all

    cfg = _cfg(tiny_cfg, "train.fuse=on", "tasks=[rte]", "seeds=[42, 7]", "train.epochs=1")
    summary = train_all(cfg, log=lambda *a: None)
    assert not summary["failures"] and len(summary["trained"]) == 4
    single = train_run(cfg, "rte", "lora", 42, HParams.from_config(cfg, "lora"))
    splits = D.splits_for(cfg, "rte")
    for method in ("lora", "full"):
        for seed in (42, 7):
            run = store.run_dir(cfg.out, "rte", method, seed)
            assert store.is_complete(run)
            m = json.loads((run / "metrics.json").read_text())
            assert set(m) == set(single) and m["step_mode"] == "fused-static"
            model, tok = M.load_trained(cfg.model, 2, run / ("adapter" if method == "lora" else "model"), method)
            enc = D.encode(tok, splits.test, cfg.task("rte"), cfg.data)
            with torch.no_grad():
                logits = M.classifier_logits(model.eval(), D.collate(enc.input_ids, tok.pad_token_id))
            assert logits.argmax(-1).tolist() == m["test_predictions"]


def test_train_all_a_method_now_and_the_rest_later(tiny_cfg):
    """`train-all --method lora` trains only the LoRA runs (one lease), a later `train-all` the rest and skips
    them (another lease: LoRA adapters travel, full-FT weights do not); an unknown --method exits 2."""
    from typer.testing import CliRunner

    from lorastudy import store
    from lorastudy.cli import app

    cfg = _cfg(tiny_cfg, "train.fuse=on", "tasks=[rte]", "seeds=[42]", "train.epochs=1")
    args = ["train-all", str(REPO / "configs" / "tiny.yaml"), "--set", f"data.source={tiny_cfg.data.source}",
            "--set", f"output_dir={cfg.out}", "--set", "train.fast_step=static", "--set", "train.fuse=on",
            "--set", "tasks=[rte]", "--set", "seeds=[42]", "--set", "train.epochs=1"]
    r = CliRunner().invoke(app, [*args, "--method", "lora"])
    assert r.exit_code == 0, r.output
    lora, full = (store.run_dir(cfg.out, "rte", m, 42) for m in ("lora", "full"))
    assert store.is_complete(lora) and not full.exists()
    summary = json.loads((cfg.out / "phase2" / "summary.json").read_text())
    assert summary["trained"] == ["rte/lora/seed42"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((cfg.out / "phase2" / "summary.json").read_text())
    assert summary["trained"] == ["rte/full/seed42"] and summary["skipped_complete"] == ["rte/lora/seed42"]
    r = CliRunner().invoke(app, [*args, "--method", "qlora"])
    assert r.exit_code == 2 and "--method 'qlora'" in r.output


def test_fused_tune_runs_exact_trial_counts_with_slot_reuse(tiny_cfg):
    """Tuning with fusion: three slots for six trials (a freed slot takes the next trial); exactly n_trials complete
    per study, as ordinary Optuna trials with their metrics."""
    from optuna.trial import TrialState

    from lorastudy import tuning

    cfg = _cfg(tiny_cfg, "train.fuse=on", "train.fuse_max_runs=3", "tasks=[rte, mrpc]", "methods=[lora]",
               "search.n_trials=3", "search.max_steps=6")
    res = tuning.tune(cfg)
    assert not res["failures"], res["failures"]
    for task in ("rte", "mrpc"):
        trials = tuning.get_study(cfg, task, "lora").get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 3 and all("val_accuracy" in t.user_attrs for t in complete)
        assert {t.user_attrs["step_mode"] for t in complete} == {"fused-static"}
        assert len({tuple(sorted(t.params.items())) for t in complete}) == 3  # trials asked at once differ
        assert (cfg.out / "phase1" / f"{task}_lora" / "best.yaml").is_file()


def test_host_batches_equal_collate():
    """The group's vectorised batch building gives what data.collate gives, for both padding sides."""
    rows = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    for side in ("right", "left"):
        mat, lens = fused.padded_matrix(rows, 2, side)
        idx = np.array([2, 0, 3])
        got = fused.collate_rows(mat, lens, idx, 8, 2, side)
        want = D.collate([rows[i] for i in idx], 2, side, pad_to=8)
        for k in ("input_ids", "attention_mask", "position_ids"):
            assert torch.equal(torch.from_numpy(got[k]), want[k]), (side, k)


def test_plan_groups_by_critical_path(tiny_cfg):
    """Long runs get small groups of identical runs (their seeds), started first; the short ones share wide groups
    per method."""
    cfg = _cfg(tiny_cfg)
    hp = lambda lr: _hp(cfg, "lora", lr=lr)  # noqa: E731
    runs = [PlannedRun(f"sst2/lora/seed{s}", "sst2", "lora", s, hp(1e-3), 100_000) for s in (1, 2, 3)]
    runs += [PlannedRun(f"sst2/full/seed{s}", "sst2", "full", s, _hp(cfg, "full"), 90_000) for s in (1, 2, 3)]
    runs += [PlannedRun(f"{t}/lora/seed{s}", t, "lora", s, hp(2e-3), n) for t, n in (("rte", 2_000),
                                                                                        ("mrpc", 4_000))
             for s in (1, 2, 3)]
    groups = plan_groups(cfg, runs, max_runs=4)
    names = [[r.name for r in g] for g in groups]
    assert names[0] == ["sst2/lora/seed1", "sst2/lora/seed2", "sst2/lora/seed3"]
    assert names[1] == ["sst2/full/seed1", "sst2/full/seed2", "sst2/full/seed3"]
    assert [len(g) for g in groups[2:]] == [4, 2] and groups[2][0].task == "mrpc"  # short lora runs, longest first


def test_fuse_config_and_device_context():
    assert load_config(None, ["train.fuse=on"]).train.fuse == "on"
    assert load_config(None, ["train.fuse=off"]).train.fuse == "off"
    with pytest.raises(ConfigError, match="fuse"):
        load_config(None, ["train.fuse=always"])
    with pytest.raises(ConfigError, match="fuse_max_runs"):
        load_config(None, ["train.fuse_max_runs=0"])
    assert resolve_device("auto", Context(device="cuda:1")) == torch.device("cuda:1")
    assert resolve_device("cpu", Context(device="cuda:1")) == torch.device("cpu")
    assert resolve_device("cuda:0", Context(device="cuda:1")) == torch.device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_fused_matches_static(tiny_cfg):
    """On a GPU: the fused step replayed as CUDA graphs computes what the same static code computes eagerly (bf16
    autocast; backward atomics make GPU reruns differ slightly), also for a run that takes a slot another run left
    (its dropout generator re-seeded), with LoRA dropout on."""
    for method in ("lora", "full"):
        specs = [{"task": "rte", "method": method, "seed": s,
                  "hp": _hp(tiny_cfg, method, lr=3e-3, epochs=1, batch_size=4, lora_dropout=0.1 * (s % 2))}
                 for s in range(3)]
        out = {}
        for mode in ("static", "cuda_graph"):
            cfg = _cfg(tiny_cfg, f"train.fast_step={mode}", "train.fuse=on")
            out[mode] = fused.train_runs(cfg, specs, slots=2)  # the third run reuses a slot
        for a, b in zip(out["static"], out["cuda_graph"], strict=True):
            assert isinstance(a, dict) and isinstance(b, dict), (a, b)
            assert b["step_mode"] == "fused-cuda_graph"
            for x, y in zip(a["curve"], b["curve"], strict=True):
                assert y["train_loss"] == pytest.approx(x["train_loss"], rel=2e-2)
                assert y["val_loss"] == pytest.approx(x["val_loss"], rel=2e-2)


def test_fused_group_applies_its_step_levers_and_notes_the_others(tiny_cfg, monkeypatch):
    """train.step_levers in a fused group: the levers that act on a fused step (fused_step.FUSED_LEVERS:
    fused_kernels) patch the group's model and are entered around every training and evaluation forward; the others
    are noted in the log; metrics.json records what was applied. Liger needs CUDA, so a stand-in computing HF's
    SwiGLU counts the calls: with it the runs equal the runs without the lever."""
    from lorastudy import layer_kernels, step_levers

    calls = {"mlp": 0, "scoped": 0}

    def stand_in(model):
        patches = M.ForwardPatches()
        for layer in layer_kernels.decoder_layers(model):
            mlp = layer.mlp

            def forward(x, mlp=mlp):
                calls["mlp"] += 1
                return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))

            patches.set(mlp, forward)

        import contextlib

        @contextlib.contextmanager
        def scoped():
            calls["scoped"] += 1
            yield

        return patches.undo, scoped

    monkeypatch.setattr(layer_kernels, "use_liger_kernels", stand_in)
    monkeypatch.setitem(step_levers.LEVERS, "fused_kernels", step_levers.Lever("fused_kernels", "stand-in"))
    logs = []
    cfg = _cfg(tiny_cfg, "train.step_levers=[fused_kernels,lora_fused]")
    plain = _cfg(tiny_cfg)
    runs = [(0, _hp(cfg, "lora", lr=3e-3, max_steps=12)), (1, _hp(cfg, "lora", lr=1e-3, max_steps=12))]
    specs = [{"task": "rte", "method": "lora", "seed": s, "hp": hp} for s, hp in runs]
    with_lever = fused.train_runs(cfg, specs, log=logs.append)
    assert calls["scoped"] > 12 and calls["mlp"] > 0  # training steps and evaluation batches
    assert any("lora_fused" in line and "lone runs only" in line for line in logs), logs
    without = fused.train_runs(plain, specs)
    for a, b in zip(without, with_lever, strict=True):
        assert isinstance(b, dict), b
        assert b["step_levers"] == ["fused_kernels"] and a["step_levers"] == []
        assert b["test_predictions"] == a["test_predictions"]
        assert [c["train_loss"] for c in b["curve"]] == pytest.approx([c["train_loss"] for c in a["curve"]], rel=REL)
