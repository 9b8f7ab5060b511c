"""The fast (static-shape, CUDA-graph on GPU) step computes what the eager reference step computes.

CUDA graphs need a GPU; on CPU the very same static code path runs without capture (``train.fast_step=static``),
which checks everything the fast path changes in the math: bucket padding, zero-weight filler rows in a short
batch, persistent gradient buffers, the 4-D mask. Graph replay itself is compared with eager on the H200 by
benchmarks/train_step.py (loss trajectories over 200 real SST-2 steps).
"""

import pytest
import torch

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy.config import load_config
from lorastudy.fast_step import StaticForward, StaticTrainStep, default_buckets
from lorastudy.training import HParams, TrainingError, make_optimizer, step_mode, train_run, train_step
from tests.conftest import REPO

PAD = 2  # the tiny model's pad token id (the classifier pools the last non-pad token)


def _tiny(method: str):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [])
    model, _ = M.load_base(cfg.model, 2, seed=0)
    if method == "lora":
        model = M.wrap_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    return model.train()


def _batches():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 200, (int(n),), generator=g).tolist() for n in (7, 12, 5, 9, 16, 3, 11)]
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    # a full batch, a short one (3 of 4 rows), then a full one again at another width
    return [(rows[0:4], labels[0:4]), (rows[4:7], labels[4:7]), (rows[1:5], labels[1:5])]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_static_step_equals_eager_step(method):
    hp = HParams(lr=5e-3, batch_size=4, epochs=1, warmup_ratio=0, weight_decay=0.01, lora_alpha=8, lora_dropout=0)
    dev = torch.device("cpu")
    ref, fast = _tiny(method), _tiny(method)
    fast.load_state_dict(ref.state_dict())
    from lorastudy.training import Setup

    p_ref = [p for p in ref.parameters() if p.requires_grad]
    p_fast = [p for p in fast.parameters() if p.requires_grad]
    init = [p.detach().clone() for p in p_ref]
    s_ref = Setup(ref, None, dev, None, 0, 0, p_ref)
    o_ref, o_fast = make_optimizer(ref, hp, dev), make_optimizer(fast, hp, dev)
    step = StaticTrainStep(fast, p_fast, o_fast, 4, 0.3, None, dev, cuda_graph=False)
    losses = []
    for rows, y in _batches():
        losses.append(float(train_step(s_ref, o_ref, None, D.collate(rows, PAD), y, 0.3)))
        step.step(D.collate(rows, PAD, pad_to=D.bucket_width(max(map(len, rows)), [8, 16, 32])), y)
    total, n = step.take_loss()
    assert n == 3
    assert float(total) == pytest.approx(sum(losses), rel=1e-5)
    # Compared as whole updates: Adam divides by sqrt(v), so float32 summation-order noise in a near-zero gradient
    # can move a single weight by ~lr; a real difference (a wrong mask, weight or lr) changes the update norm.
    for a, b, a0 in zip(p_ref, p_fast, init, strict=True):
        d_ref, d_fast = a.detach() - a0, b.detach() - a0
        assert (d_ref - d_fast).norm() <= 1e-3 * d_ref.norm() + 1e-8


def test_static_forward_equals_eager_forward():
    model = _tiny("lora").eval()
    rows, _ = _batches()[1]  # 3 rows into a runner of 4
    runner = StaticForward(model, 4, None, torch.device("cpu"), cuda_graph=False)
    got = runner.logits(D.collate(rows, PAD, pad_to=32))
    with torch.no_grad():
        want = M.classifier_logits(model, D.collate(rows, PAD))
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        runner.logits(D.collate(rows, PAD, pad_to=32))


def test_static_train_run_equals_eager_train_run(tiny_cfg):
    """A whole run (LoRA, a short last batch each epoch, bucketed widths) gives the same curve and predictions."""
    cfg_off = load_config(REPO / "configs" / "tiny.yaml", [f"data.source={tiny_cfg.data.source}",
                                                         f"output_dir={tiny_cfg.output_dir}", "train.fast_step=off"])
    cfg_static = cfg_off.model_copy(update={"train": cfg_off.train.model_copy(update={"fast_step": "static"})})
    hp = HParams.from_config(cfg_off, "lora", {"epochs": 2, "lr": 2e-3, "batch_size": 3, "lora_dropout": 0.0})
    eager = train_run(cfg_off, "rte", "lora", 0, hp)
    static = train_run(cfg_static, "rte", "lora", 0, hp)
    assert eager["step_mode"] == "eager" and static["step_mode"] == "static"
    assert eager["n_train"] % 3 != 0  # the last batch of each epoch is short: filler rows are exercised
    assert eager["test_predictions"] == static["test_predictions"]
    assert len(eager["curve"]) == len(static["curve"])
    for a, b in zip(eager["curve"], static["curve"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_step_mode_and_buckets():
    cpu = torch.device("cpu")
    assert step_mode("auto", cpu) == "eager" and step_mode("static", cpu) == "static"
    assert step_mode("auto", torch.device("cuda")) == "cuda_graph"
    with pytest.raises(TrainingError, match="needs a CUDA device"):
        step_mode("cuda_graph", cpu)
    assert load_config(None, ["train.fast_step=false"]).train.fast_step == "eager"
    from lorastudy.config import ConfigError

    with pytest.raises(ConfigError, match="fast_step"):
        load_config(None, ["train.fast_step=turbo"])
    assert default_buckets(384)[-1] == 384 and default_buckets(40) == [16, 32, 40]
    with pytest.raises(ValueError, match="CUDA device"):
        StaticTrainStep(_tiny("full"), [], None, 4, 0.3, None, cpu, cuda_graph=True)



def test_fused_rms_norm_same_forward_and_gradients():
    """torch.rms_norm in place of HF's RMSNorm: same logits and gradients; undo restores HF's code."""
    from lorastudy.fast_step import fuse_rms_norms

    ref, fused = _tiny("full"), _tiny("full")
    fused.load_state_dict(ref.state_dict())
    batch = D.collate(_batches()[0][0], PAD)
    y = torch.tensor([0, 1, 1, 0])
    undo = fuse_rms_norms(fused)
    norms = [m for m in fused.modules() if "forward" in vars(m)]
    assert len(norms) == 2 * fused.config.num_hidden_layers + 1  # two per layer + the final norm
    outs = []
    for model in (ref, fused):
        logits = M.classifier_logits(model, batch)
        torch.nn.functional.cross_entropy(logits, y).backward()
        outs.append((logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for g_ref, g_fused in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(g_ref, g_fused, rtol=1e-4, atol=1e-6)
    # a bf16 input keeps HF's code (its rounding differs from the fused kernel's)
    x = torch.randn(2, 3, fused.config.hidden_size, dtype=torch.bfloat16)
    norm = norms[0]
    torch.testing.assert_close(norm(x), type(norm).forward(norm, x))
    undo()
    assert not any("forward" in vars(m) for m in fused.modules())


def test_seeded_dropout_replaces_lora_dropout_and_keeps_its_distribution():
    model = M.wrap_lora(M.load_base(load_config(REPO / "configs" / "tiny.yaml", []).model, 2, seed=0)[0],
                        4, 8, 0.25, ["q_proj", "v_proj"])
    gen = M.seed_dropout(model, 7, torch.device("cpu"))
    drops = [m for m in model.modules() if isinstance(m, M.SeededDropout)]
    assert gen is not None and len(drops) == 2 * model.config.num_hidden_layers
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    assert M.dropout_generators(model) == [gen]
    d = drops[0].train()
    y = d(torch.ones(200_000))
    assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # inverted scaling keeps the expectation
    assert torch.equal(d.eval()(torch.ones(10)), torch.ones(10))
    assert M.seed_dropout(_tiny("full"), 0, torch.device("cpu")) is None  # nothing to replace
    with pytest.raises(ValueError):
        M.SeededDropout(1.0, gen)


def test_dropout_masks_come_from_the_run_seed_alone(tiny_cfg):
    """With LoRA dropout, a run gives the same result alone and beside another run in the same process (threads,
    as with --streams): its masks come from its own generator, not the shared default one. On a GPU the runs
    replay CUDA graphs while the other captures (which failed with the shared generator in PyTorch < 2.13)."""
    from lorastudy.workers import run_threads

    mode = "cuda_graph" if torch.cuda.is_available() else "static"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.source={tiny_cfg.data.source}",
                                                     f"output_dir={tiny_cfg.output_dir}", f"train.fast_step={mode}"])
    hp = HParams.from_config(cfg, "lora", {"epochs": 1, "lr": 2e-3, "batch_size": 2, "lora_dropout": 0.3})
    run = lambda seed, device: train_run(cfg, "rte", "lora", seed, hp)  # noqa: E731
    alone = run(0, None)
    torch.rand(1000)  # draws from the default generator between runs change nothing
    both = run_threads([("a", 0), ("b", 1)], None, run)
    assert all(r.ok for r in both), [r.error for r in both]
    beside = both[0].value
    assert alone["step_mode"] == beside["step_mode"] == mode
    # exact on CPU; on a GPU up to kernel nondeterminism (other masks would move the losses by far more)
    assert [c["train_loss"] for c in beside["curve"]] == pytest.approx([c["train_loss"] for c in alone["curve"]],
                                                                       rel=1e-5 if mode == "cuda_graph" else 0)
    assert alone["test_predictions"] == beside["test_predictions"]
    # and dropout is really on: another seed's masks give another curve
    assert [c["train_loss"] for c in both[1].value["curve"]] != [c["train_loss"] for c in alone["curve"]]
