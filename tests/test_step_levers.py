"""Each speed lever of the static step (``train.step_levers``) computes what the plain static step computes.

CPU, tiny random Llama, three optimizer steps (a full batch, a short one with filler rows, another width), LoRA with
seeded dropout on. float32: the levers must agree with the plain static path to float32 rounding (losses 1e-5
relative, each parameter update within 1e-3 of its norm, logits 1e-5). bf16 autocast (CPU supports it): the bf16
weight copies must reproduce autocast bit for bit; the fused LoRA forward rounds in another order (bf16 tolerance).
The compile lever is checked with the ``aot_eager`` backend (Dynamo + AOTAutograd, the same graphs without
Inductor's code generation, which takes minutes on two CPU cores); Inductor itself runs on the H200 benchmark.
"""

import pytest
import torch

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy.config import ConfigError, load_config
from lorastudy.fast_step import StaticForward, StaticTrainStep, fuse_rms_norms
from lorastudy.step_levers import LEVERS, StepLevers
from lorastudy.training import HParams, make_optimizer, train_run
from tests.conftest import REPO

PAD = 2
CPU = torch.device("cpu")


def _model(method: str):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [])
    model, _ = M.load_base(cfg.model, 2, seed=0)
    if method == "lora":
        torch.manual_seed(0)
        model = M.wrap_lora(model, 4, 8, 0.2, ["q_proj", "v_proj"])
        M.seed_dropout(model, 0, CPU)  # masks from the run's generator: the same draws with and without levers
    fuse_rms_norms(model)
    return model.train()


def _data():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 200, (int(n),), generator=g).tolist() for n in (7, 12, 5, 9, 16, 3, 11)]
    y = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    return rows, [(rows[0:4], y[0:4], 16), (rows[4:7], y[4:7], 16), (rows[1:5], y[1:5], 32)]


def _train(method: str, levers: StepLevers, amp=None):
    """Three static steps, then a static evaluation forward; (losses, parameters, logits, model)."""
    model = _model(method)
    params = [p for p in model.parameters() if p.requires_grad]
    hp = HParams(lr=5e-3, batch_size=4, epochs=1, warmup_ratio=0, weight_decay=0.01, lora_alpha=8, lora_dropout=0.2)
    step = StaticTrainStep(model, params, make_optimizer(model, hp, CPU), 4, 0.3, amp, CPU, cuda_graph=False,
                           levers=levers)
    rows, batches = _data()
    losses = []
    for r, y, width in batches:
        step.step(D.collate(r, PAD, pad_to=width), y)
        losses.append(float(step.take_loss()[0]))
    model.eval()
    fwd = StaticForward(model, 4, amp, CPU, cuda_graph=False, levers=levers)
    logits = fwd.logits(D.collate(rows[:3], PAD, pad_to=16)).clone()
    step.close()
    fwd.close()
    return losses, [p.detach().clone() for p in params], logits, model


def _init(method: str):
    return [p.detach().clone() for p in _model(method).parameters() if p.requires_grad]


CPU_LEVERS = [("bf16_weights",), ("flat_optimizer",), ("lora_fused",), ("fused_projections",),
              ("bf16_weights", "flat_optimizer", "lora_fused", "fused_projections")]


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("names", CPU_LEVERS, ids="+".join)
def test_lever_matches_plain_static_step_fp32(method, names):
    ref = _train(method, StepLevers())
    got = _train(method, StepLevers.of(*names))
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    for a, b, a0 in zip(ref[1], got[1], _init(method), strict=True):
        d_ref, d_got = a - a0, b - a0
        assert (d_ref - d_got).norm() <= 1e-3 * d_ref.norm() + 1e-8
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_weights_reproduce_autocast_exactly(method):
    """bf16 autocast on CPU: the once-per-step bf16 copies give the very numbers of autocast's per-matmul casts."""
    ref = _train(method, StepLevers(), amp=torch.bfloat16)
    got = _train(method, StepLevers.of("bf16_weights"), amp=torch.bfloat16)
    assert got[0] == ref[0]
    for a, b in zip(ref[1], got[1], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got[2], ref[2])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_cpu_levers_under_bf16_within_rounding(method):
    """All CPU levers under bf16 autocast: the fused LoRA and fused projections round in another order."""
    ref = _train(method, StepLevers(), amp=torch.bfloat16)
    got = _train(method, StepLevers.of("lora_fused", "bf16_weights", "flat_optimizer", "fused_projections"),
                 amp=torch.bfloat16)
    # the first loss is one forward: bf16 rounding only (8 bits of mantissa: 4e-3 per rounding); later ones follow
    # AdamW steps at lr 5e-3 on a random tiny model, which amplify those roundings
    assert got[0][0] == pytest.approx(ref[0][0], rel=2e-3)
    assert got[0] == pytest.approx(ref[0], rel=2e-2)
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=2e-2)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fused_projections_run_fewer_matmuls(method):
    """One forward+backward: q/k/v and gate/up as two matmuls per layer instead of five (plus their backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lorastudy.fused_projections import fuse_sibling_projections

    class CountMM(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMM.n += func.__name__.split(".")[0] in ("mm", "addmm", "bmm")
            return func(*args, **(kwargs or {}))

    rows, batches = _data()
    batch = D.collate(batches[0][0], PAD, pad_to=16)
    counts = []
    for fuse in (False, True):
        model = _model(method).eval()  # no dropout: the same ops otherwise
        if fuse:
            fuse_sibling_projections(model)
        CountMM.n = 0
        with CountMM():
            M.classifier_logits(model, batch).sum().backward()
        counts.append(CountMM.n)
    layers = model.config.num_hidden_layers
    # forward 5 -> 2; backward: input gradients 5 -> 2, and (full FT) weight gradients 5 -> 2. LoRA: the frozen
    # embedding needs no gradient, so layer 0's q/k/v input-gradient matmuls (3, fused 1) are skipped either way
    assert counts[0] - counts[1] == (layers * 9 if method == "full" else layers * 6 - 2)


def test_bf16_weights_and_flat_buffers_structure():
    """The masters stay float32 in the modules; the copies are bf16 and hold no gradient between steps; with the
    flat optimizer the parameters are views of one buffer until close(), which gives them their own storage."""
    model = _model("full")
    params = [p for p in model.parameters() if p.requires_grad]
    hp = HParams(lr=1e-3, batch_size=4, epochs=1, warmup_ratio=0, weight_decay=0.0, lora_alpha=8, lora_dropout=0)
    step = StaticTrainStep(model, params, make_optimizer(model, hp, CPU), 4, 0.3, torch.bfloat16, CPU,
                           cuda_graph=False, levers=StepLevers.of("bf16_weights", "flat_optimizer"))
    _, batches = _data()
    r, y, width = batches[0]
    step.step(D.collate(r, PAD, pad_to=width), y)
    cw = step.compute
    assert cw.flat.dtype == torch.bfloat16 and all(c.grad is None for c in cw.copies)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight is cw.masters[cw.modules.index(q)]  # outside the forward the module holds its master
    torch.testing.assert_close(cw.copies[cw.modules.index(q)].float(), q.weight.detach(), rtol=4e-3, atol=0)
    storages = {p.untyped_storage().data_ptr() for p in params}
    assert len(storages) == 1 and cw._src_block is not None  # one flat buffer: the refresh is one copy
    step.close()
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)
    assert not hasattr(model, "_lorastudy_compute_weights")  # the last user released the copies


def test_compile_lever_same_results_with_aot_eager():
    """LoRA with dropout, fused forward and compiled layers: same results, and the dropout draw (a custom op)
    does not break the compiled layer into pieces."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref = _train("lora", StepLevers())
    got = _train("lora", StepLevers.of("compile", "lora_fused", "fused_projections", compile_backend="aot_eager"))
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    model = got[3]
    assert all(layer._compiled_call_impl is not None for layer in M.backbone(model).layers)
    model._lorastudy_model_levers.undo()
    assert all(layer._compiled_call_impl is None for layer in M.backbone(model).layers)


def test_static_train_run_with_levers_equals_without(tiny_cfg):
    """A whole LoRA run: same curve, predictions and best step. Checks the evaluation forward's refresh (the best
    weights restored before the test split reach the bf16 copies) and close() of the flat buffers."""
    base = [f"data.source={tiny_cfg.data.source}", f"output_dir={tiny_cfg.output_dir}", "train.fast_step=static"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", base)
    cfg_levers = load_config(REPO / "configs" / "tiny.yaml",
                             base + ["train.step_levers=[bf16_weights,flat_optimizer,lora_fused,fused_projections]"])
    hp = HParams.from_config(cfg, "lora", {"epochs": 3, "lr": 2e-2, "batch_size": 6, "lora_dropout": 0.1})
    plain, fast = train_run(cfg, "rte", "lora", 0, hp), train_run(cfg_levers, "rte", "lora", 0, hp)
    assert plain["best_step"] < plain["steps"]  # the best weights are restored before the test split
    assert fast["step_levers"] == ["bf16_weights", "flat_optimizer", "fused_projections", "lora_fused"]
    assert plain["step_levers"] == []
    assert fast["best_step"] == plain["best_step"]
    assert fast["test_predictions"] == plain["test_predictions"]
    assert fast["test"]["loss"] == pytest.approx(plain["test"]["loss"], rel=1e-5)
    for a, b in zip(plain["curve"], fast["curve"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


def test_lever_config_validation():
    assert load_config(None, ["train.step_levers=[compile,bf16_weights]"]).train.step_levers == \
        ["compile", "bf16_weights"]
    with pytest.raises(ConfigError, match="unknown step lever"):
        load_config(None, ["train.step_levers=[turbo]"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["train.step_levers=[compile,compile]"])
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config(None, ["train.compile_mode=fastest"])
    assert set(LEVERS) == {"bf16_weights", "flat_optimizer", "compile", "fused_kernels", "lora_fused",
                           "fused_projections"}
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StaticTrainStep(_model("full"), [], None, 4, 0.3, None, CPU, cuda_graph=False,
                        levers=StepLevers.of("fused_kernels"))
    with pytest.raises(ValueError, match="AdamW"):
        model = _model("full")
        params = [p for p in model.parameters() if p.requires_grad]
        StaticTrainStep(model, params, torch.optim.SGD(params, lr=0.1), 4, 0.3, None, CPU, cuda_graph=False,
                        levers=StepLevers.of("flat_optimizer"))
