"""Parity of the serving engines on random tiny models (fp32, CPU), routing, real adapters, benchmark smoke."""

import json

import pytest
import torch

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy.config import load_config
from lorastudy.serving.benchmark import overhead_analysis, run_benchmark
from lorastudy.serving.build import build_engines, synthetic_adapters
from lorastudy.serving.engines import adapter_from_peft

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(None)
    base, tok = M.load_base(cfg.model, 2, seed=0)
    adapters = synthetic_adapters(base, 4, rank=8, alpha=16, targets=TARGETS, seed=1)
    engines = build_engines(base, adapters, TARGETS, ["merged", "peft", "batched"], "cpu", torch.float32)
    texts = ["short", "a somewhat longer input sentence", "x y z", "the movie was great fun", "meh", "ok then go"]
    batch = D.collate([tok(t)["input_ids"] for t in texts], tok.pad_token_id, "right")
    return engines, adapters, batch


def test_parity_merged_peft_batched(setup):
    engines, adapters, batch = setup
    idx = torch.tensor([0, 1, 2, 3, 1, 0])
    ref = engines["merged"](batch, idx)
    for name in ("peft", "batched"):
        torch.testing.assert_close(engines[name](batch, idx), ref, atol=1e-5, rtol=1e-5)
    # adapters really differ: the same row through another adapter changes its logits
    other = engines["batched"](batch, torch.tensor([1, 2, 3, 0, 0, 1]))
    assert (other - ref).abs().max() > 1e-3


def test_routing_shuffled_rows_give_shuffled_outputs(setup):
    engines, _, batch = setup
    idx = torch.tensor([0, 1, 2, 3, 1, 0])
    out = engines["batched"](batch, idx)
    perm = torch.tensor([5, 3, 0, 4, 1, 2])
    shuffled = {k: v[perm] for k, v in batch.items()}
    torch.testing.assert_close(engines["batched"](shuffled, idx[perm]), out[perm], atol=1e-6, rtol=1e-6)


def test_each_row_matches_its_own_single_adapter_model(setup):
    engines, adapters, batch = setup
    idx = torch.tensor([3, 2, 1, 0, 3, 2])
    out = engines["batched"](batch, idx)
    for row in range(6):
        sub = {k: v[row:row + 1] for k, v in batch.items()}
        single = M.classifier_logits(engines["merged"].models[int(idx[row])], sub)
        torch.testing.assert_close(out[row:row + 1], single, atol=1e-5, rtol=1e-5)


def test_prepared_4d_mask_matches_2d(setup):
    engines, _, batch = setup
    idx = torch.tensor([0, 1, 2, 3, 1, 0])
    b4 = {**batch, "mask4d": M.additive_mask_4d(batch["attention_mask"], torch.float32)}
    for e in engines.values():
        torch.testing.assert_close(e(b4, idx), e(batch, idx), atol=1e-6, rtol=1e-6)


def test_real_saved_adapters_from_phase2_run_dirs(tiny_cfg):
    from lorastudy import store
    from lorastudy.serving.build import study_adapters
    from lorastudy.training import HParams, run_and_save

    cfg = load_config(None, [f"data.source={tiny_cfg.data.source}", f"output_dir={tiny_cfg.output_dir}",
                             "tasks=[rte, sst2]", "seeds=[1]", "data.train_limit={rte: 32, sst2: 32}",
                             "data.test_limit={rte: 16, sst2: 16}", "data.max_length=48"])
    for t in cfg.tasks:
        run_and_save(cfg, t, "lora", 1, HParams.from_config(cfg, "lora", {"epochs": 1, "lr": 5e-3}),
                     store.run_dir(cfg.out, t, "lora", 1))
    tok = M.load_tokenizer(cfg.model)
    base, adapters = study_adapters(cfg, tok)
    assert [a.name for a in adapters] == ["rte-s1", "sst2-s1"]
    engines = build_engines(base, adapters, cfg.lora.target_modules, ["merged", "peft", "batched"], "cpu",
                            torch.float32)
    batch = D.collate([tok(t)["input_ids"] for t in ["a film", "two sentences here", "x"]], tok.pad_token_id)
    idx = torch.tensor([1, 0, 1])
    ref = engines["merged"](batch, idx)
    torch.testing.assert_close(engines["batched"](batch, idx), ref, atol=1e-5, rtol=1e-5)
    # and the reloaded PEFT run gives the same logits as the batched engine for its rows
    pm, _ = M.load_trained(cfg.model, 2, store.run_dir(cfg.out, "sst2", "lora", 1) / "adapter", "lora", tok)
    torch.testing.assert_close(M.classifier_logits(pm.eval(), batch)[[0, 2]], ref[[0, 2]], atol=1e-5, rtol=1e-5)
    a = adapter_from_peft(pm, "x", "sst2")
    assert a.score.shape == (2, base.config.hidden_size)


def test_benchmark_smoke_schema():
    cfg = load_config(None)
    base, _ = M.load_base(cfg.model, 2, seed=0)
    adapters = synthetic_adapters(base, 3, targets=TARGETS, tasks=["sst2", "mrpc", "rte"])
    res = run_benchmark(base, adapters, targets=TARGETS, batch_sizes=(1, 4), seq_len=12, warmup=1, requests=5,
                        eager_requests=3)
    rec = res["records"]
    assert {r["engine"] for r in rec} == {"merged", "peft", "batched"}
    assert all(len(r["_samples"]) == 3 for r in rec)  # no CUDA graphs on CPU: every row is timed eagerly
    assert {(r["engine"], r["fused"]) for r in rec} == {("merged", True), ("batched", True), ("peft", False)}
    for r in rec:
        for k in ("engine", "n_adapters", "batch_size", "seq_len", "throughput_rps", "peak_memory_bytes",
                  "max_abs_logit_diff"):
            assert k in r
        assert set(r["latency_ms"]) == {"mean", "p50", "p95", "p99"}
        assert r["latency_ms"]["p50"] > 0
    assert max(r["max_abs_logit_diff"] for r in rec) < 1e-4
    ov = overhead_analysis(rec, n_boot=200)
    assert ov["H2"]["per_batch_size"] and ov["H2"]["decision"] in {"supported", "contradicted",
                                                                   "not supported (inconclusive)"}
    for r in ov["rows"]:
        assert r["ci95"][0] <= r["overhead"] <= r["ci95"][1] or abs(r["ci95"][1] - r["ci95"][0]) < 1e-9
    json.dumps({k: v for k, v in res.items() if k != "records"})
    assert res["mixed_traffic"] and "A: merged per task" in res["mixed_traffic"][0]


def test_seq_len_from_probe_texts(tiny_cfg):
    from lorastudy.serving.benchmark import probe_median_length

    n = probe_median_length(tiny_cfg)
    assert 8 <= n <= tiny_cfg.data.max_length
