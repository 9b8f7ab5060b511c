"""Parity of the serving engines on random tiny models (fp32, CPU), routing, real adapters, benchmark smoke."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy.config import ConfigError, load_config
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
    class Progress:
        total = done = calls = 0

        def set_total(self, n):
            self.total = n

        def advance_rows(self, n):
            self.done += n
            self.calls += 1

    prog = Progress()
    res = run_benchmark(base, adapters, targets=TARGETS, batch_sizes=(1, 4), seq_len=12, warmup=1, requests=5,
                        eager_requests=3, engines=("merged", "peft", "batched", "vllm"), progress=prog)
    rec = res["records"]
    assert prog.total == len(rec) and prog.done == pytest.approx(len(rec))
    assert prog.calls == 3 * len(rec)  # advanced after each timed block (3 repeats), not once at the end
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
    assert {r["mixing"] for r in rec if r["batch_size"] == 1 and r["n_adapters"] > 1} == {"in rotation"}
    assert all(len(r["repeat_mean_ms"]) == 3 for r in rec)  # 3 calls in at most 10 repeats: 3 repeats of 1
    assert all(r["memory_kind"].startswith("weights only") for r in rec)  # CPU: activations are not measured
    assert res["vllm"]["status"] == "skipped" and "not importable" in res["vllm"]["reason"]
    ov = overhead_analysis(rec, n_boot=200)
    assert ov["H2"]["per_batch_size"] and ov["H2"]["decision"] in {
        "supported", "contradicted", "not supported (inconclusive)",
        "not decided: measurement problem (see the flagged batch sizes)"}
    for r in ov["rows"]:
        assert r["ci95"][0] <= r["overhead"] <= r["ci95"][1] or abs(r["ci95"][1] - r["ci95"][0]) < 1e-9
    json.dumps({k: v for k, v in res.items() if k != "records"})
    assert res["mixed_traffic"] and "A: merged per task" in res["mixed_traffic"][0]


def test_an_interrupted_serve_bench_resumes_at_the_batch_size_it_stopped_in(tmp_path, monkeypatch):
    """Serving on a study's adapters takes ~15 minutes on the H200 (88 conditions for 8 adapters): a pass cut by a
    time limit keeps each finished batch size (phase4/deployment/partial/) and the next pass times only the rest."""
    from lorastudy.serving import benchmark as B

    sets = [f"output_dir={tmp_path / 'res'}", "serve.batch_sizes=[1, 2, 4]", "serve.seq_len=8", "serve.warmup=1",
            "serve.requests=2", "serve.repeats=2", "serve.max_adapters=2", "serve.engines=[merged, batched]"]
    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", sets)
    real, timed = B.interleave, []

    def stop_at_batch_size_2(conds, *a, **k):
        b = conds[0].fields.get("batch_size")
        timed.append(b)
        if b == 2:
            raise KeyboardInterrupt("time limit")
        return real(conds, *a, **k)

    monkeypatch.setattr(B, "interleave", stop_at_batch_size_2)
    with pytest.raises(KeyboardInterrupt):
        B.run_serve_bench(cfg, log=lambda *a: None)
    dep = cfg.out / "phase4" / "deployment"
    assert not (dep / "benchmark_results.json").exists()  # unfinished never looks finished
    kept = json.loads((dep / "partial" / "b1.json").read_text())
    assert sorted((dep / "partial").iterdir()) == [dep / "partial" / "b1.json"]

    def count(conds, *a, **k):  # (mixed traffic's conditions have no batch size)
        if "batch_size" in conds[0].fields:
            timed.append(conds[0].fields["batch_size"])
        return real(conds, *a, **k)

    monkeypatch.setattr(B, "interleave", count)
    timed.clear()
    # (serve.archs names other parts of the phase: adding one does not discard this part's batch sizes)
    res = B.run_serve_bench(load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml",
                                        [*sets, "serve.archs=[smollm2]"]), log=lambda *a: None)
    assert timed == [2, 4] and res["resumed_batch_sizes"] == [1]
    # (parity is measured again by every pass, on the same weights)
    assert [{k: v for k, v in r.items() if k != "max_abs_logit_diff"} for r in res["records"]
            if r["batch_size"] == 1] == kept["records"]
    assert sorted({r["batch_size"] for r in res["records"]}) == [1, 2, 4]
    assert not (dep / "partial").exists() and (dep / "benchmark_results.json").is_file()
    # the report says which batch sizes an earlier pass timed
    from typer.testing import CliRunner

    from lorastudy.cli import app

    r = CliRunner().invoke(app, ["report", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"),
                                 *[x for s in sets for x in ("--set", s)]])
    assert r.exit_code == 0, r.output
    assert "Batch size 1 was timed by an earlier, interrupted pass" in (cfg.out / "ANALYSIS_REPORT.md").read_text()

    # a checkpoint measured with other settings is not taken: everything is timed again
    (dep / "benchmark_results.json").unlink()
    (dep / "partial").mkdir()
    (dep / "partial" / "b1.json").write_text(json.dumps(kept))
    timed.clear()
    other = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", [*sets, "serve.requests=3"])
    res = B.run_serve_bench(other, log=lambda *a: None, force=False)
    assert timed == [1, 2, 4] and res["resumed_batch_sizes"] == []
    # a finished result is current only for the serving settings it was measured with
    assert B.current_result(other) is not None and B.current_result(cfg) is None
    doc = json.loads((dep / "benchmark_results.json").read_text())
    del doc["serve"]  # (results written before the settings were recorded: not compared)
    (dep / "benchmark_results.json").write_text(json.dumps(doc))
    assert B.current_result(cfg) is not None


def test_a_serve_bench_interrupted_in_the_mixed_traffic_resumes_there(tmp_path, monkeypatch, glue_dir):
    """The mixed-traffic scenarios run after the last batch size (minutes on the H200 with vLLM): a pass cut there
    keeps each batch size's scenarios (partial/traffic_b<B>.json), and the next pass times neither the batch sizes
    nor the scenarios already done."""
    from typer.testing import CliRunner

    from lorastudy.cli import app
    from lorastudy.serving import benchmark as B

    sets = [f"output_dir={tmp_path / 'res'}", f"data.source={glue_dir}", "serve.batch_sizes=[1, 2, 4]",
            "serve.seq_len=8", "serve.warmup=1", "serve.requests=2", "serve.repeats=2", "serve.max_adapters=2",
            "serve.engines=[merged, batched]"]
    conf = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    cfg = load_config(conf, sets)
    real, timed = B.interleave, []

    def stop_in_the_second_traffic_batch_size(conds, *a, **k):
        b = conds[0].fields.get("batch_size", "traffic")
        timed.append(b)
        if timed.count("traffic") == 2:
            raise KeyboardInterrupt("time limit")
        return real(conds, *a, **k)

    monkeypatch.setattr(B, "interleave", stop_in_the_second_traffic_batch_size)
    with pytest.raises(KeyboardInterrupt):
        B.run_serve_bench(cfg, log=lambda *a: None)
    part = cfg.out / "phase4" / "deployment" / "partial"
    assert sorted(p.name for p in part.iterdir()) == ["b1.json", "b2.json", "b4.json", "traffic_b1.json"]
    kept = json.loads((part / "traffic_b1.json").read_text())["traffic"]

    def count(conds, *a, **k):
        timed.append(conds[0].fields.get("batch_size", "traffic"))
        return real(conds, *a, **k)

    monkeypatch.setattr(B, "interleave", count)
    timed.clear()
    res = B.run_serve_bench(cfg, log=lambda *a: None)
    assert timed == ["traffic", "traffic"]  # batch sizes 2 and 4's scenarios only
    assert res["resumed_batch_sizes"] == [1, 2, 4] and res["resumed_traffic_batch_sizes"] == [1]
    assert [m["batch_size"] for m in res["mixed_traffic"]] == [1, 2, 4]
    assert res["mixed_traffic"][0] == {**kept, "resumed": True}
    r = CliRunner().invoke(app, ["report", str(conf), *[x for s in sets for x in ("--set", s)]])
    assert r.exit_code == 0, r.output
    assert ("Batch sizes 1, 2, 4 and the mixed-traffic scenarios at batch size 1 were timed by an earlier, "
            "interrupted pass") in (cfg.out / "ANALYSIS_REPORT.md").read_text()


def test_a_resumed_batch_size_keeps_vllm_rows_only_when_this_pass_runs_vllm():
    """A batch size checkpointed by a pass whose vLLM ran is timed again by a pass without vLLM (and vice versa):
    otherwise the result would say vLLM was skipped and still hold (and decide H2 on) vLLM rows."""
    from lorastudy.serving.vllm_bench import ADAPTERS

    cfg = load_config(None)
    base, _ = M.load_base(cfg.model, 2, seed=0)
    adapters = synthetic_adapters(base, 2, targets=TARGETS, tasks=["sst2", "mrpc"])
    kw = dict(targets=TARGETS, batch_sizes=(1, 2), seq_len=8, warmup=1, requests=2, repeats=2,
              engines=("merged", "batched"), log=lambda *a: None)
    first = run_benchmark(base, adapters, **kw)
    b1 = [{k: v for k, v in r.items() if k != "_samples"} for r in first["records"] if r["batch_size"] == 1]
    res = run_benchmark(base, adapters, done={1: b1}, **kw)
    assert res["resumed_batch_sizes"] == [1]
    with_vllm = b1 + [{**b1[0], "engine": ADAPTERS}]
    res = run_benchmark(base, adapters, done={1: with_vllm}, **kw)
    assert res["resumed_batch_sizes"] == [] and not any(r["engine"] == ADAPTERS for r in res["records"])


def test_seq_len_from_probe_texts(tiny_cfg):
    from lorastudy.serving.benchmark import probe_median_length

    n = probe_median_length(tiny_cfg)
    assert 8 <= n <= tiny_cfg.data.max_length


# -- adapters whose tasks have different label counts (issue 14.4) ------------------------------------------------
def test_every_engine_returns_each_row_its_own_tasks_logits():
    from lorastudy.serving.build import merged_model

    cfg = load_config(None)
    base, tok = M.load_base(cfg.model, 2, seed=0)
    adapters = synthetic_adapters(base, 2, targets=TARGETS, seed=4, num_labels={"two": 2, "three": 3},
                                  tasks=["two", "three"])
    engines = build_engines(base, adapters, TARGETS, ["merged", "peft", "batched"], "cpu", torch.float32)
    texts = ["short", "a somewhat longer input sentence", "x y z", "the movie was great fun", "meh"]
    batch = D.collate([tok(t)["input_ids"] for t in texts], tok.pad_token_id, "right")
    idx = torch.tensor([0, 1, 1, 0, 1])
    own = []  # each row through its own adapter's merged model alone
    for row, a in enumerate(idx.tolist()):
        m = merged_model(base, adapters[a])
        own.append(M.classifier_logits(m, {k: v[row:row + 1] for k, v in batch.items()})[0])
    for name, eng in engines.items():
        for fused in ((True, False) if name != "peft" else (False,)):
            eng.set_fused(fused)
            out = eng(batch, idx)
            assert out.shape == (5, 3), name
            for row, a in enumerate(idx.tolist()):
                c = adapters[a].num_labels
                torch.testing.assert_close(out[row, :c], own[row], atol=1e-5, rtol=1e-5, msg=name)
                assert torch.isneginf(out[row, c:]).all(), f"{name}: phantom class in row {row}"
            assert (out.argmax(-1) < torch.tensor([adapters[a].num_labels for a in idx.tolist()])).all()
    # one task per batch too (the merged baseline's shape): still the padded width
    assert engines["merged"](batch, torch.zeros(5, dtype=torch.long), [0]).shape == (5, 3)


def test_serve_bench_and_report_with_a_two_and_a_three_class_task(tmp_path):
    from typer.testing import CliRunner

    from lorastudy.cli import app

    out = tmp_path / "res"
    sets = [f"output_dir={out}", "tasks=[sst2, nli3]", "methods=[lora]",
            "custom_tasks={nli3: {name: nli3, text_fields: [premise, hypothesis], "
            "label_names: [entailment, neutral, contradiction]}}",
            "serve.batch_sizes=[1, 2]", "serve.seq_len=8", "serve.warmup=1", "serve.requests=2",
            "serve.repeats=2", "serve.max_adapters=2"]
    args = ["serve-bench", str(Path(__file__).parents[1] / "configs" / "tiny.yaml")]
    for s in sets:
        args += ["--set", s]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    res = json.loads((out / "phase4" / "deployment" / "benchmark_results.json").read_text())
    assert sorted(res["label_counts"].values()) == [2, 3]
    assert max(v for v in res["parity_max_abs_logit_diff"].values() if v is not None) < 1e-4
    r = CliRunner().invoke(app, ["report", args[1]] + [x for s in sets for x in ("--set", s)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    text = (out / "ANALYSIS_REPORT.md").read_text()
    assert "label counts: a0 2, a1 3" in text


# -- a fair merged baseline: sub-batches padded to captured sizes (issue 16.4) ------------------------------------
def test_split_runner_pads_each_adapters_rows_to_a_captured_size(setup):
    from lorastudy.serving.engines import SplitRunner

    engines, _, batch = setup
    batch = {k: torch.cat([v, v[:1]]) for k, v in batch.items()}  # 7 rows
    idx = torch.tensor([0, 1, 2, 0, 1, 0, 0])
    seen = []

    def make_runner(engine, sub, sub_idx, present):
        seen.append((present[0], sub["input_ids"].shape[0]))
        return lambda b, i, p: engine(b, sub_idx, p)

    split = SplitRunner(engines["merged"], batch, idx, sizes=(1, 2, 4, 8), make_runner=make_runner)
    assert sorted(seen) == [(0, 4), (1, 2), (2, 1)] and split.padded_rows == 7
    torch.testing.assert_close(split(batch), engines["merged"](batch, idx), atol=1e-6, rtol=1e-6)
    split3 = SplitRunner(engines["merged"], batch, torch.tensor([0, 0, 0, 1, 1, 1, 2]), sizes=(1, 2, 4, 8))
    assert split3.padded_rows == 4 + 4 + 1  # three rows run as a captured batch of four
    torch.testing.assert_close(split3(batch), engines["merged"](batch, torch.tensor([0, 0, 0, 1, 1, 1, 2])),
                               atol=1e-6, rtol=1e-6)


# -- timing and statistics (issues 19.3, 14.8) --------------------------------------------------------------------
def test_conditions_are_interleaved_in_time():
    from lorastudy.serving.timing import Condition, interleave

    log = []

    class Fake(Condition):
        def warm(self, n):
            log.append(("warm", self.fields["name"], n))

        def time(self, n):
            log.append((self.fields["name"], n))
            return np.ones(n)

    conds = [Fake({"name": c}, 7) for c in "ABC"]
    blks = interleave(conds, repeats=3, warmup=2)
    assert log[:3] == [("warm", c, 2) for c in "ABC"]
    assert log[3:] == [("A", 3), ("B", 3), ("C", 3), ("B", 2), ("C", 2), ("A", 2), ("C", 2), ("A", 2), ("B", 2)]
    assert [len(b) for b in blks[0]] == [3, 2, 2]


def test_rotation_when_a_batch_cannot_hold_every_adapter():
    from lorastudy.serving.benchmark import slot_calls

    assert slot_calls(4, 3) == ("mixed in batch", [[0, 1, 2, 0]])
    assert slot_calls(4, 1) == ("single adapter", [[0, 0, 0, 0]])
    mixing, calls = slot_calls(1, 3)
    assert mixing == "in rotation" and calls == [[0], [1], [2]]
    mixing, calls = slot_calls(2, 3)
    assert mixing == "in rotation" and sorted(sum(calls, [])) == [0, 0, 1, 1, 2, 2]


def _rec(engine, b, k, means):
    return {"engine": engine, "batch_size": b, "n_adapters": k, "latency_ms": {"mean": float(np.mean(means))},
            "repeat_mean_ms": [float(x) for x in means]}


def _records(factor, rng, engines=("merged", "batched")):
    out = []
    for b in (1, 4):
        ref = 10 * b ** 0.5 * (1 + rng.normal(0, 0.01, 10))
        out.append(_rec(engines[0], b, 1, ref))
        for k in (1, 2, 3):
            out.append(_rec(engines[1], b, k, ref * factor * (1 + rng.normal(0, 0.01, 10))))
    return out


def test_h2_direction_decisions_and_flags():
    rng = np.random.default_rng(0)
    ok = overhead_analysis(_records(1.05, rng), n_boot=1000)["H2"]  # 5% overhead, well within 30%
    assert ok["decision"] == "supported" and ok["engine"] == "batched" and ok["n_adapters"] == 3
    assert all(r["p_holm"] < 0.01 for r in ok["per_batch_size"])
    bad = overhead_analysis(_records(1.6, rng), n_boot=1000)["H2"]  # 60%: the whole CI above the bound
    assert bad["decision"] == "contradicted" and all(r["p_one_sided_h2"] > 0.9 for r in bad["per_batch_size"])
    assert "contradicted when a batch size's whole 95% CI lies above 30%" in bad["decision_rule"]  # (stated)
    odd = overhead_analysis(_records(0.5, rng), n_boot=1000)  # "50% faster than merged": a measurement problem
    assert odd["H2"]["decision"].startswith("not decided: measurement problem")
    assert all(r["flag"] and "faster" in r["flag"] for r in odd["rows"])
    assert all(r["decision"] == "measurement problem" for r in odd["H2"]["per_batch_size"])
    v = overhead_analysis(_records(1.05, rng, ("merged-vllm", "vllm")), n_boot=1000)
    assert v["H2_vllm"]["decision"] == "supported" and v["H2_vllm"]["reference"] == "merged-vllm"
    assert v["H2"]["engine"] is None


def test_overhead_ci_resamples_repeats_not_single_calls():
    """The same computation in two conditions (true overhead 0), each repeat shifted by up to +-13% by the machine's
    state (as measured on CPU), calls within a repeat nearly identical; by chance the shifts average +4% for one
    condition. Resampling single calls gives a CI about +-0.6% wide around +4% that excludes 0; resampling repeats
    covers 0."""
    from lorastudy import stats as T

    rng = np.random.default_rng(0)
    shift_x = [1.13, 0.95, 1.10, 0.98, 1.12, 0.97, 1.08, 1.01, 1.05, 1.01]
    shift_y = [0.90, 1.05, 0.92, 1.10, 0.95, 1.06, 0.93, 1.04, 0.97, 1.08]
    x = [f * (1 + rng.normal(0, 0.005, 100)) for f in shift_x]
    y = [f * (1 + rng.normal(0, 0.005, 100)) for f in shift_y]
    res = T.paired_ratio_bootstrap([b.mean() for b in x], [b.mean() for b in y], n_resamples=2000)
    assert res["ci"][0] < 0 < res["ci"][1] and res["n_units"] == 10
    xc, yc = np.concatenate(x), np.concatenate(y)
    iid = [xc[rng.integers(0, 1000, 1000)].mean() / yc[rng.integers(0, 1000, 1000)].mean() - 1 for _ in range(500)]
    lo, hi = np.quantile(iid, [0.025, 0.975])
    assert not lo < 0 < hi and (res["ci"][1] - res["ci"][0]) > 5 * (hi - lo)
    assert T.bootstrap_p_value(res["distribution"], 0.3, "less") < 0.01
    with pytest.raises(ValueError, match="paired units"):
        T.paired_ratio_bootstrap([1.0], [1.0])


class _EagerGraph:
    """GraphRunner's interface and semantics (static buffers, the captured adapters) without CUDA: lets the CPU
    run the benchmark's graph branches, which the H200 runs with real graphs."""

    def __init__(self, engine, example_batch, example_idx, present=None, warmup=3):
        self.engine, self.present = engine, present
        self.static = {k: v.clone() for k, v in example_batch.items()}
        self.static_idx = example_idx.clone()

    def __call__(self, batch, idx, present=None):
        for k, v in batch.items():
            self.static[k].copy_(v)
        if idx is not None:
            self.static_idx.copy_(idx)
        return self.engine(self.static, self.static_idx, self.present)


def test_graph_branches_route_every_call_like_the_engine(setup, monkeypatch):
    from lorastudy.serving import benchmark as B

    engines, adapters, batch = setup
    monkeypatch.setattr(B, "GraphRunner", _EagerGraph)
    bt = {k: v[:2] for k, v in batch.items()}  # batch 2, 4 adapters: one, two mixed, three and four in rotation
    seen = set()
    conds = B._local_conditions(engines, 2, bt, torch.device("cpu"), True, True, 2, 2, [1, 2, 4], 4,
                                dict.fromkeys(engines, 1), print)
    for c in conds:
        f = c.fields
        seen.add((f["engine"], f["cuda_graph"], f["mixing"]))
        for j, call in enumerate(c.calls):
            idx = torch.tensor(B.slot_calls(2, f["n_adapters"])[1][j])
            eng = engines[f["engine"].split("-")[0]]
            eng.set_fused(f["fused"])
            torch.testing.assert_close(call(), eng(bt, idx), atol=1e-5, rtol=1e-5, msg=str(f))
    assert {("merged", True, "mixed in batch"), ("merged", True, "in rotation"), ("merged", True, "single adapter"),
            ("batched-eager", False, "in rotation"), ("merged-eager", False, "single adapter")} <= seen
    assert len(conds) == B._n_conditions(list(engines), [2], 4, True, True, False)
    plan = B.traffic_plan(adapters, [2], 6, 100, 6, torch.device("cpu"), torch.Generator().manual_seed(0), None)
    out = B.mixed_traffic(engines, plan, torch.device("cpu"), graphs=True)
    assert out[0]["A: merged per task"]["batches"] >= 3 and out[0]["cuda_graphs"]


# -- the serving phase's parts: the study's adapters and random-weight architectures (issue 18) -------------------
def test_serve_bench_also_times_each_architecture_of_serve_archs(tmp_path, monkeypatch, glue_dir):
    """`serve.archs` adds a random-weight architecture (the study plan's TinyLlama beside a smaller study) as its own
    part, into phase4/deployment/<arch>/: timed after the study's adapters, skipped when current, reported beside
    them (its own H2), left out of an export while unfinished; a bad --only is a clear error."""
    from typer.testing import CliRunner

    from lorastudy import pipeline
    from lorastudy.cli import app
    from lorastudy.serving import benchmark as B
    from lorastudy.serving import build

    # (the real 1.1B shapes are for the GPU; the part's plumbing is the same at any size)
    monkeypatch.setitem(build.SYNTHETIC_ARCHS, "tinyllama", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    conf = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    out = tmp_path / "res"
    sets = [f"output_dir={out}", f"data.source={glue_dir}", "serve.batch_sizes=[1, 2]", "serve.seq_len=8",
            "serve.warmup=1", "serve.requests=2", "serve.repeats=2", "serve.engines=[merged, batched]",
            "serve.archs=[tinyllama]"]
    opts = [x for s in sets for x in ("--set", s)]
    cfg = load_config(conf, sets)
    dep = out / "phase4" / "deployment"
    r = CliRunner().invoke(app, ["serve-bench", conf, "--only", "adapters", *opts])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (dep / "benchmark_results.json").is_file() and not (dep / "tinyllama").exists()
    assert not pipeline._up_to_date(cfg, "serve")  # one part is still missing
    r = CliRunner().invoke(app, ["serve-bench", conf, "--only", "llama7b", *opts])
    assert r.exit_code == 2 and "--only must be one of ['adapters', 'tinyllama']" in r.output
    r = CliRunner().invoke(app, ["serve-bench", conf, "--only", "tinyllama", "--synthetic-arch", "smollm2", *opts])
    assert r.exit_code == 2 and "--synthetic-arch replaces the study's adapters" in r.output
    with pytest.raises(ConfigError, match="lists an architecture twice"):
        load_config(conf, [*sets, "serve.archs=[tinyllama, tinyllama]"])

    # an interrupted pass of the architecture's part: its checkpoint is unfinished work, which export leaves out
    real = B.interleave

    def stop_at_batch_size_2(conds, *a, **k):
        if conds[0].fields.get("batch_size") == 2:
            raise KeyboardInterrupt("time limit")
        return real(conds, *a, **k)

    monkeypatch.setattr(B, "interleave", stop_at_batch_size_2)
    with pytest.raises(KeyboardInterrupt):
        B.run_serve_bench(cfg, log=lambda *a: None, extra_arch="tinyllama")
    assert (dep / "tinyllama" / "partial" / "b1.json").is_file()
    # a file of the user's own among the checkpoints is not one of them
    (dep / "tinyllama" / "partial" / "b_notes.json").write_text("[1, 2]")
    from lorastudy import store
    from lorastudy.merge import export_study

    store.check_manifest(cfg)  # (what `run` writes first: export wants a results dir)
    export_study(out, tmp_path / "exported", log=lambda *a: None)
    assert not list((tmp_path / "exported").rglob("partial"))
    monkeypatch.setattr(B, "interleave", real)

    r = CliRunner().invoke(app, ["serve-bench", conf, *opts])  # every part: the adapters' is current, skipped
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "exists; skipping" in r.output
    res = json.loads((dep / "tinyllama" / "benchmark_results.json").read_text())
    main = json.loads((dep / "benchmark_results.json").read_text())
    assert res["synthetic_arch"] == "tinyllama" and res["resumed_batch_sizes"] == [1]
    # as many adapters as the study trains (tasks x seeds), the study's own adapters' part untouched
    assert res["n_adapters_total"] == len(cfg.tasks) * len(cfg.seeds) and main["synthetic_arch"] is None
    assert "b_notes.json is not a checkpoint of this benchmark; ignored" in r.output
    assert (dep / "tinyllama" / "overhead_analysis.json").is_file() and list((dep / "tinyllama").glob("*.png"))
    assert pipeline._up_to_date(cfg, "serve")
    with pytest.raises(ConfigError, match="serve.archs"):
        B.run_serve_bench(load_config(conf, sets[:-1]), extra_arch="tinyllama")

    r = CliRunner().invoke(app, ["report", conf, *opts])
    assert r.exit_code == 0, r.output + repr(r.exception)
    text = (out / "ANALYSIS_REPORT.md").read_text()
    assert "### At the `tinyllama` architecture's size (random weights): the study plan's model" in text
    assert "- **H2 at the `tinyllama` architecture's size (random weights):** `batched` serving 6 adapters" in text \
        and "\n| H2 (`tinyllama`) | batch 1 |" in text.split("## Statistical summary")[1]
    assert "](phase4/deployment/tinyllama/latency_vs_batch.png)" in text
    assert "- **Memory:** peak " in text and "- **Memory (`tinyllama`):** peak " in text
    assert "H2 in vLLM" not in text  # (no vLLM rows here)
    # a part copied in from another machine is reported even where the config does not name it
    r = CliRunner().invoke(app, ["report", conf, *[x for s in sets[:-1] for x in ("--set", s)]])
    assert r.exit_code == 0 and "### At the `tinyllama` architecture's size" in (out / "ANALYSIS_REPORT.md").read_text()

    # serve.max_adapters caps the architecture's tasks x seeds adapters; it does not raise their number
    from lorastudy.serving.build import synthetic_adapters as real_adapters

    made = []
    monkeypatch.setattr(B, "synthetic_adapters", lambda base, n, *a, **k: made.append(n) or real_adapters(
        base, n, *a, **k))
    monkeypatch.setattr(B, "run_benchmark", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    for cap, want in ((4, 4), (10, 6)):
        with pytest.raises(KeyboardInterrupt):
            B.run_serve_bench(load_config(conf, [*sets, f"serve.max_adapters={cap}"]), log=lambda *a: None,
                              extra_arch="tinyllama", force=True)
        assert made[-1] == want
    assert text.count("Overhead against merged (one task per batch)") == 2


def test_the_summary_gives_h2_in_vllm_vllm_against_batched_and_memory():
    """The executive summary's serving bullets besides H2: vLLM's own H2 with its overhead range, how much longer
    vLLM's calls took than batched's, and the peak memory of one model per adapter against one base."""
    from lorastudy.report.build import _serve_summary, template

    rng = np.random.default_rng(0)
    recs = _records(1.05, rng) + _records(1.6, rng, ("merged-vllm", "vllm"))
    for r in recs:  # merged holds a model per adapter: 3x the batched engine's bytes
        r["peak_memory_bytes"] = (3 if r["engine"] == "merged" else 1) * 2**20 * 100
    ov = overhead_analysis(recs, n_boot=200)
    best = _serve_summary({"records": recs, "memory_kind": "weights only"}, ov)
    assert best["memory"] == {"batch_size": 4, "merged": 300 * 2**20, "batched": 100 * 2**20, "kind": "weights only"}
    assert best["vllm_vs_batched"]["min"] > 0.4
    text = str(template("serving.md.j2").module.serving_extras(ov, best, ""))
    lines = text.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("- **H2 in vLLM:** `vllm` (base + 3 adapters as LoRA requests) "
                                                   "vs `merged-vllm`: overhead between ")
    assert "→ **contradicted**; per call, `vllm` took" in lines[0]
    assert lines[1] == ("- **Memory:** peak 300.0 MiB for `merged` (one model per adapter, 3) against 100.0 MiB "
                        "for `batched` (one base, stacked adapters), at batch 4 (weights only).")
    # without vLLM rows or memory figures: nothing
    bare = [{k: v for k, v in r.items() if k != "peak_memory_bytes"} for r in _records(1.05, rng)]
    assert str(template("serving.md.j2").module.serving_extras(overhead_analysis(bare, n_boot=50),
                                                _serve_summary({"records": bare},
                                                               overhead_analysis(bare, n_boot=50)), "")).strip() == ""


def test_the_resumed_pass_sentence_names_what_each_pass_timed():
    """Which conditions an earlier, interrupted pass timed and which the finishing pass did (a helper's review: the
    sentence said "the rest" where there was none, and named mixed traffic that did not exist)."""
    from lorastudy.report.build import resumed_words

    recs = [{"batch_size": b} for b in (1, 2, 4)]
    mt = [{"batch_size": b} for b in (1, 2, 4)]
    assert resumed_words({"records": recs, "mixed_traffic": mt}) == ""
    s = resumed_words({"resumed_batch_sizes": [1, 2, 4], "records": recs, "mixed_traffic": mt, "gpu": "H200"})
    assert s.startswith("Batch sizes 1, 2, 4 were timed by an earlier") and "GPU model" in s
    assert s.endswith("; the mixed-traffic scenarios at batch sizes 1, 2, 4 and parity by the pass that finished.")
    s = resumed_words({"resumed_batch_sizes": [1, 2, 4], "records": recs, "mixed_traffic": []})
    assert s.endswith("; parity by the pass that finished.") and "mixed-traffic" not in s
    s = resumed_words({"resumed_traffic_batch_sizes": [1], "records": recs, "mixed_traffic": mt})
    assert s.startswith("The mixed-traffic scenarios at batch size 1 were timed")
    assert "; batch sizes 1, 2, 4, the mixed-traffic scenarios at batch sizes 2, 4 and parity by" in s
    s = resumed_words({"resumed_batch_sizes": [1], "records": recs, "mixed_traffic": mt})
    assert s.startswith("Batch size 1 was timed") and "; batch sizes 2, 4, the mixed-traffic scenarios" in s
