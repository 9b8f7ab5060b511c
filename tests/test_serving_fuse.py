"""Serving fusions (serving/fuse.py): same function as HF's plain modules, fewer kernels, shared weights."""

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lorastudy import modeling as M
from lorastudy.config import load_config
from lorastudy.serving.benchmark import _weights_bytes
from lorastudy.serving.build import build_engines, merged_model, synthetic_adapters
from lorastudy.serving.fuse import Switch, fuse_for_serving

TARGET_SETS = {
    "qv": ["q_proj", "v_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "lone-and-partial": ["o_proj", "up_proj"],  # a group of one, and one member of gate/up
}


class OpCounter(TorchFunctionMode):
    """Counts torch calls by name at the Python level (on CPU ``rms_norm`` is decomposed below it)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def base():
    cfg = load_config(None)
    return M.load_base(cfg.model, 2, seed=0)[0]


def _batch(pad_id: int, n=6, s=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one right-padded row (HF pools at the last token that is not the pad id)
    ids[1, 7:] = pad_id
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


@pytest.mark.parametrize("targets", list(TARGET_SETS.values()), ids=list(TARGET_SETS))
def test_fused_and_plain_paths_match_plain_merged(base, targets):
    adapters = synthetic_adapters(base, 4, rank=8, alpha=16, targets=targets, seed=3)
    # ranks may differ between adapters: the stacked factors are zero-padded
    adapters[2].lora = {k: (a[:4], b[:, :4]) for k, (a, b) in adapters[2].lora.items()}
    eng = build_engines(base, adapters, targets, ["merged", "peft", "batched"], "cpu", torch.float32)
    batch, idx = _batch(base.config.pad_token_id), torch.tensor([0, 1, 2, 3, 2, 0])
    eng["merged"].set_fused(False)
    ref = eng["merged"](batch, idx)
    torch.testing.assert_close(eng["peft"](batch, idx), ref, atol=1e-5, rtol=1e-5)
    for name in ("merged", "batched"):
        for fused in (True, False):
            eng[name].set_fused(fused)
            torch.testing.assert_close(eng[name](batch, idx), ref, atol=1e-5, rtol=1e-5,
                                       msg=f"{name} fused={fused}")


def test_fused_path_runs_fewer_matmuls_and_one_norm_kernel(base):
    """Per layer: q/k/v and gate/up as one matmul each (7 -> 4), RMSNorm as torch's fused op; the batched engine
    with q and v targeted adds one shrink (bmm) and one expand (baddbmm) per layer, not two of each."""
    layers = base.config.num_hidden_layers
    adapters = synthetic_adapters(base, 3, targets=TARGET_SETS["qv"], seed=1)
    eng = build_engines(base, adapters, TARGET_SETS["qv"], ["merged", "batched"], "cpu", torch.float32)
    batch, idx = _batch(base.config.pad_token_id), torch.tensor([0, 1, 2, 0, 1, 2])
    counts = {}
    for name in ("merged", "batched"):
        for fused in (True, False):
            eng[name].set_fused(fused)
            with OpCounter() as c:
                eng[name](batch, idx if name == "batched" else torch.zeros(6, dtype=torch.long), [0])
            counts[name, fused] = c.ops
    assert counts["merged", False]["linear"] - counts["merged", True]["linear"] == 3 * layers
    assert counts["merged", True]["rms_norm"] == 2 * layers + 1  # + the final norm
    assert counts["merged", False]["rms_norm"] == 0
    assert counts["batched", True]["bmm"] == layers + 1  # shrink per layer + the stacked score heads
    assert counts["batched", True]["baddbmm_"] == layers
    assert counts["batched", False]["bmm"] == 2 * layers + 1
    assert counts["batched", False]["baddbmm_"] == 2 * layers


def test_fusion_shares_weights_and_switches_back(base):
    m = merged_model(base, synthetic_adapters(base, 1, targets=TARGET_SETS["qv"])[0])
    before = _weights_bytes(m)
    batch = _batch(base.config.pad_token_id)
    ref = M.classifier_logits(m, batch)
    sw = Switch()
    fuse_for_serving(m, sw)
    assert _weights_bytes(m) == before  # the projections' weights are views into the fused one
    attn = m.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(M.classifier_logits(m, batch), ref, atol=1e-5, rtol=1e-5)
    sw.fused = False
    torch.testing.assert_close(M.classifier_logits(m, batch), ref, atol=1e-6, rtol=1e-6)


def test_sibling_called_out_of_order_raises(base):
    m = merged_model(base, synthetic_adapters(base, 1, targets=TARGET_SETS["qv"])[0])
    fuse_for_serving(m, Switch())
    attn = m.model.layers[0].self_attn
    x = torch.randn(1, 4, base.config.hidden_size)
    with pytest.raises(RuntimeError, match="out of order"):
        attn.k_proj(x)
    attn.q_proj(x)
    with pytest.raises(RuntimeError, match="another input"):
        attn.k_proj(x.clone())
