"""Mid-run checkpoints (checkpoint.py): a run interrupted and resumed gives exactly the results of one
uninterrupted run (fp32, CPU), for a lone run and for a fused group; checkpoints of another run are never loaded."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorastudy import checkpoint as CK
from lorastudy import execution, fused, store
from lorastudy.config import load_config
from lorastudy.pipeline import train_all
from lorastudy.training import HParams, run_and_save
from tests.conftest import REPO

# what a resumed run must reproduce exactly (timings excluded)
EXACT = ("curve", "best_step", "validation", "test", "test_predictions", "steps", "train_tokens", "stopped_early",
         "total_steps_planned")


def _cfg(tiny_cfg, *sets):
    # on the CPU unless a test says otherwise (the exactness tests are fp32 CPU tests, also on a GPU machine)
    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"data.source={tiny_cfg.data.source}", f"output_dir={tiny_cfg.output_dir}",
                        "lora.dropout=0.1", "train.device=cpu", *sets])


def stop_at(k: int):
    """A time budget that runs out at the k-th step boundary it is asked about."""
    n = [0]

    def stop() -> bool:
        n[0] += 1
        return n[0] >= k

    return stop


def _same(a: dict, b: dict) -> None:
    for k in EXACT:
        assert a[k] == b[k], k


def _weights(run) -> dict:
    sub = "adapter/adapter_model.safetensors" if (run / "adapter").is_dir() else "model/model.safetensors"
    return load_file(run / sub)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_lone_run_paused_twice_and_resumed_is_exact(tiny_cfg, tmp_path, method):
    # LoRA with dropout 0.1: the dropout generator's state must come back for this to be exact
    cfg = _cfg(tiny_cfg, "train.fuse=off")
    hp = HParams.from_config(cfg, method)  # rte: 8 steps per epoch, 16 steps, evaluations every 4
    ref = run_and_save(cfg, "rte", method, 42, hp, tmp_path / "ref")
    run = tmp_path / "run"
    ckpt = CK.path_for(run)
    steps = []
    for k in (4, 3):  # paused right after the evaluation at step 4, then between evaluations (step 7)
        with pytest.raises(CK.RunPaused) as e:
            run_and_save(cfg, "rte", method, 42, hp, run, stop=stop_at(k))
        steps.append(e.value.step)
        assert store.is_complete(ckpt) and not run.exists() and not (tmp_path / f"run.{store.FAILED}").exists()
    assert steps == [4, 7]
    m = run_and_save(cfg, "rte", method, 42, hp, run)
    _same(m, ref)
    assert not ckpt.exists()  # removed once the run is saved
    a, b = _weights(tmp_path / "ref"), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("before,after", [([], ["flat_optimizer"]), (["flat_optimizer"], [])])
def test_a_checkpoint_is_not_resumed_under_other_step_levers(tiny_cfg, tmp_path, before, after):
    """The config hash leaves the step levers out, but flat_optimizer keeps AdamW's state in another layout: a run
    paused under one set of levers starts afresh under another (as the run with those levers, uninterrupted)."""
    sets = ("train.fuse=off", "train.fast_step=static")
    cfg = _cfg(tiny_cfg, *sets, f"train.step_levers=[{','.join(before)}]")
    later = _cfg(tiny_cfg, *sets, f"train.step_levers=[{','.join(after)}]")
    assert cfg.hash() == later.hash()
    hp = HParams.from_config(cfg, "lora")
    run = tmp_path / "run"
    with pytest.raises(CK.RunPaused):
        run_and_save(cfg, "rte", "lora", 42, hp, run, stop=stop_at(5))
    assert json.loads((CK.path_for(run) / CK.IDENTITY).read_text()).get("levers", []) == before
    m = run_and_save(later, "rte", "lora", 42, hp, run)
    ref = run_and_save(later, "rte", "lora", 42, hp, tmp_path / "ref")
    _same(m, ref)
    assert m["step_levers"] == after


def test_interrupt_request_writes_a_checkpoint_and_raises(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, "train.fuse=off")
    hp = HParams.from_config(cfg, "lora")
    ref = run_and_save(cfg, "rte", "lora", 42, hp, tmp_path / "ref")

    def signal_at_5() -> bool:  # what the SIGTERM handler does while a run trains
        n = signal_at_5.n = getattr(signal_at_5, "n", 0) + 1
        if n == 5:
            execution.request_interrupt()
        return False

    try:
        with pytest.raises(KeyboardInterrupt):
            run_and_save(cfg, "rte", "lora", 42, hp, tmp_path / "run", stop=signal_at_5)
    finally:
        execution.clear_interrupt()
    assert store.is_complete(CK.path_for(tmp_path / "run")) and not (tmp_path / f"run.{store.FAILED}").exists()
    _same(run_and_save(cfg, "rte", "lora", 42, hp, tmp_path / "run"), ref)


def test_checkpoint_of_other_hparams_or_config_is_ignored(tiny_cfg, tmp_path, caplog):
    cfg = _cfg(tiny_cfg, "train.fuse=off")
    hp = HParams.from_config(cfg, "lora")
    run = tmp_path / "run"
    with pytest.raises(CK.RunPaused):
        run_and_save(cfg, "rte", "lora", 42, hp, run, stop=stop_at(6))
    other = HParams.from_config(cfg, "lora", {"lr": 1e-3})
    ref_other = run_and_save(cfg, "rte", "lora", 42, other, tmp_path / "ref_other")
    with caplog.at_level("WARNING", logger="lorastudy.checkpoint"):
        m = run_and_save(cfg, "rte", "lora", 42, other, run)
    assert "ignored, not loaded" in caplog.text and "hparams" in caplog.text
    _same(m, ref_other)  # trained from scratch, not from the checkpoint of lr 5e-3
    # and another config (the hash differs): refused as well
    with pytest.raises(CK.RunPaused):
        run_and_save(cfg, "rte", "lora", 42, hp, run, stop=stop_at(6))
    cfg2 = _cfg(tiny_cfg, "train.fuse=off", "train.max_grad_norm=0.5")
    ident = CK.identity(cfg2, "rte", "lora", 42, hp, path="eager")
    assert CK.load(CK.path_for(run), ident, warn=lambda s: None) is None
    ident = CK.identity(cfg, "rte", "lora", 42, hp, path="eager")
    assert CK.load(CK.path_for(run), ident) is not None


def test_half_written_checkpoint_is_never_loaded(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, "train.fuse=off")
    hp = HParams.from_config(cfg, "lora")
    ident = CK.identity(cfg, "rte", "lora", 42, hp, path="eager")
    path = tmp_path / "seed42.ckpt"
    CK.save(path, ident, {"x": torch.arange(3)})
    assert torch.equal(CK.load(path, ident)["x"], torch.arange(3))
    state = path / CK.STATE
    state.write_bytes(state.read_bytes()[:-7])  # truncated, as a kill mid-write would leave it without the rename
    said = []
    assert CK.load(path, ident, warn=said.append) is None and "incomplete or corrupted" in said[0]


def test_a_fused_checkpoint_of_another_weight_layout_is_ignored(tiny_cfg, tmp_path):
    """A fused group's optimizer state follows its weight buffers (fused_step._Bank.layout): a checkpoint written
    with other buffers (an older lorastudy: full FT kept its embeddings beside the matmul weights) starts the run
    from scratch instead of failing it at every retry."""
    cfg = _cfg(tiny_cfg, "train.fuse=on")
    hp = HParams.from_config(cfg, "full")
    path = tmp_path / "seed42.ckpt"
    old = CK.identity(cfg, "rte", "full", 42, hp, path="fused-static", layout=[("mm", 100), ("none", 10)])
    CK.save(path, old, {"x": torch.arange(3)})
    new = CK.identity(cfg, "rte", "full", 42, hp, path="fused-static",
                      layout=[("mm", 90), ("decay", 10), ("none", 10)])
    said = []
    assert CK.load(path, new, warn=said.append) is None and "layout" in said[0]
    assert CK.load(path, old) is not None


def _fused(cfg, method, out, stop=None, device=torch.device("cpu"), runs=(0, 1), log=None):
    """Two runs of different seeds, learning rates, batch sizes and lengths in one fused group of 2 slots (or
    only ``runs`` of them, one slot each)."""
    hps = [HParams.from_config(cfg, method),
           HParams.from_config(cfg, method, {"lr": 2e-3 if method == "lora" else 5e-4, "batch_size": 4,
                                             "epochs": 1.5})]
    res = {}
    jobs = [fused.RunJob(f"r{i}", "rte", method, seed, hp, on_done=lambda m, i=i: res.__setitem__(i, m),
                         on_fail=lambda e, i=i: res.__setitem__(i, e), checkpoint=out / f"r{i}.ckpt",
                         on_pause=lambda p, i=i: res.__setitem__(i, "paused"))
            for i, (seed, hp) in enumerate(zip((42, 1337), hps, strict=True)) if i in runs]
    g = fused.FusedGroup(cfg, method, 2, len(jobs), 8, device=device, dropout=True, log=log)
    g.run(fused.ListSource(jobs), stop)
    return res


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("optimizer", ["torch", "triton"])
def test_fused_group_paused_twice_and_resumed_is_exact(tiny_cfg, tmp_path, method, optimizer):
    # each slot's weights, best copy, AdamW moments (and step counts: fused_adamw keeps its own), dropout
    # generator, schedule, loss window and RunState. ``triton``: in Triton's interpreter (tests/test_fused_adamw.py)
    from lorastudy import fused_adamw

    if optimizer == "triton" and not fused_adamw.available(torch.device("cpu")):
        pytest.skip("the kernel runs here only in Triton's interpreter (tests/test_fused_adamw.py)")
    cfg = _cfg(tiny_cfg, "train.fuse=on", f"train.fuse_optimizer={optimizer}")
    ref = _fused(cfg, method, tmp_path / "ref")
    out = tmp_path / "run"
    assert _fused(cfg, method, out, stop_at(4)) == {0: "paused", 1: "paused"}  # run 0 right after an evaluation
    assert _fused(cfg, method, out, stop_at(3)) == {0: "paused", 1: "paused"}  # both between evaluations
    res = _fused(cfg, method, out)
    for i in (0, 1):
        _same(res[i], ref[i])
        assert not (out / f"r{i}.ckpt").exists()
    assert res[1]["steps"] == 24 and res[0]["steps"] == 16


def test_fused_run_resumes_in_a_smaller_group(tiny_cfg, tmp_path):
    # phase 2 after an interruption regroups the unfinished runs only: run 0 (16 steps) finished before the pause,
    # run 1 (24 steps) continues alone in a group of one slot
    cfg = _cfg(tiny_cfg, "train.fuse=on")
    ref = _fused(cfg, "lora", tmp_path / "ref")
    out = tmp_path / "run"
    first = _fused(cfg, "lora", out, stop_at(20))
    assert first[0]["steps"] == 16 and first[1] == "paused"
    said = []
    res = _fused(cfg, "lora", out, runs=(1,), log=said.append)[1]
    assert any("resuming from checkpoint" in s for s in said)  # (from scratch it would give the same numbers)
    assert res["best_step"] == ref[1]["best_step"] and res["test_predictions"] == ref[1]["test_predictions"]
    assert [c["val_loss"] for c in res["curve"]] == pytest.approx([c["val_loss"] for c in ref[1]["curve"]],
                                                                  rel=1e-5)


@pytest.mark.parametrize("fuse", ["on", "off"])
def test_train_all_pauses_at_the_budget_and_resumes_exactly(tiny_cfg, tmp_path, fuse):
    sets = ("tasks=[rte]", "methods=[lora]", "seeds=[42, 1337]", f"train.fuse={fuse}")
    cfg = _cfg(tiny_cfg, *sets)
    s = train_all(cfg, stop=stop_at(6), log=lambda s: None)  # phase 2 cut mid-run by the time budget
    assert s["paused"] and not s["failures"]
    for name in s["paused"]:
        assert store.is_complete(CK.path_for(cfg.out / "phase2" / name))
    s = train_all(cfg, log=lambda s: None)
    assert not s["paused"] and not s["failures"] and len(s["trained"]) + len(s["skipped_complete"]) == 2
    ref = _cfg(tiny_cfg, *sets, f"output_dir={tmp_path / 'ref'}")
    train_all(ref, log=lambda s: None)
    for seed in (42, 1337):
        run = store.run_dir(cfg.out, "rte", "lora", seed)
        _same(json.loads((run / "metrics.json").read_text()),
              json.loads((store.run_dir(ref.out, "rte", "lora", seed) / "metrics.json").read_text()))
        assert not CK.path_for(run).exists()
    # a checkpoint left beside a complete run (killed between saving and removing it) is cleaned up, not resumed
    stale = CK.path_for(store.run_dir(cfg.out, "rte", "lora", 42))
    CK.save(stale, {}, {})
    assert train_all(cfg, log=lambda s: None)["skipped_complete"] and not stale.exists()


def test_sigterm_checkpoints_exits_130_and_the_rerun_resumes(tiny_cfg, tmp_path):
    out = tmp_path / "results"
    sets = ["--set", f"data.source={tiny_cfg.data.source}", "--set", f"output_dir={out}", "--set",
            "lora.dropout=0.1", "--set", "train.patience=1000", "--set", "hp.epochs=12"]
    cmd = [sys.executable, "-m", "lorastudy.cli", "train", str(REPO / "configs" / "tiny.yaml"), "--task", "rte",
           "--method", "lora", "--seed", "3", *sets]
    run = out / "phase2" / "rte" / "lora" / "seed3"
    ckpt = CK.path_for(run)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([*cmd, "--set", "train.checkpoint_every_min=0.0001"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpt / store.COMPLETE).exists() and p.poll() is None:
        time.sleep(0.05)  # a first periodic checkpoint: the run is inside its training loop
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130, err[-2000:]
    assert "writing checkpoints at the next step boundary" in err
    assert store.is_complete(ckpt) and not run.exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed_at = int(re.search(r"at\s+step\s+(\d+)\s+of\s+96", r.stderr).group(1))  # (rich wraps lines)
    assert 0 < resumed_at < 96
    got = json.loads((run / "metrics.json").read_text())
    cfg = load_config(REPO / "configs" / "tiny.yaml", [s for s in sets[1::2] if not s.startswith("hp.")])
    ref = run_and_save(cfg, "rte", "lora", 3, HParams.from_config(cfg, "lora", {"epochs": 12}), tmp_path / "ref")
    assert got["steps"] == 96 and not ckpt.exists()
    _same(got, ref)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu/checkpoint.sh)")


def _close(a: dict, b: dict, name: str) -> None:
    """On a GPU (bf16, CUDA graphs): the same evaluation points and best step, validation losses within bf16 noise;
    prints whether the resumed run is bit-identical."""
    assert [c["step"] for c in a["curve"]] == [c["step"] for c in b["curve"]] and a["steps"] == b["steps"]
    la, lb = [c["val_loss"] for c in a["curve"]], [c["val_loss"] for c in b["curve"]]
    assert lb == pytest.approx(la, rel=2e-2), name
    agree = sum(x == y for x, y in zip(a["test_predictions"], b["test_predictions"], strict=True))
    print(f"{name}: resumed == uninterrupted exactly: {all(a[k] == b[k] for k in EXACT)}; max val-loss rel diff "
          f"{max(abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True)):.2e}; test predictions agree "
          f"{agree}/{len(a['test_predictions'])}")


@cuda
@pytest.mark.parametrize("method", ["lora", "full"])
def test_cuda_graph_fused_group_resumes(tiny_cfg, tmp_path, method):
    # in-place loading into state the captured graphs read (AdamW moments, loss window, lr), generator states of
    # graph-registered dropout generators
    cfg = _cfg(tiny_cfg, "train.fuse=on", "train.device=cuda", "train.fast_step=cuda_graph")
    ref = _fused(cfg, method, tmp_path / "ref", device=torch.device("cuda"))
    out = tmp_path / "run"
    assert _fused(cfg, method, out, stop_at(4), device=torch.device("cuda")) == {0: "paused", 1: "paused"}
    assert _fused(cfg, method, out, stop_at(3), device=torch.device("cuda")) == {0: "paused", 1: "paused"}
    res = _fused(cfg, method, out, device=torch.device("cuda"))
    for i in (0, 1):
        _close(ref[i], res[i], f"fused-cuda_graph {method} run {i}")


@cuda
def test_cuda_graph_lone_run_resumes(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, "train.fuse=off", "train.device=cuda", "train.fast_step=cuda_graph")
    hp = HParams.from_config(cfg, "lora")
    ref = run_and_save(cfg, "rte", "lora", 42, hp, tmp_path / "ref")
    for k in (4, 3):
        with pytest.raises(CK.RunPaused):
            run_and_save(cfg, "rte", "lora", 42, hp, tmp_path / "run", stop=stop_at(k))
    _close(ref, run_and_save(cfg, "rte", "lora", 42, hp, tmp_path / "run"), "lone cuda_graph lora")
