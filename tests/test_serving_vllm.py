"""The vllm engine's pieces on CPU: head-stripping export, gathered heads, the worker JSON contract, the version
switch, and the whole vllm path through a fake ``vllm`` package (tests/fake_vllm: vLLM's offline pooling API with
0.26 semantics, computed by Hugging Face) in worker subprocesses."""

import importlib
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lorastudy import modeling as M
from lorastudy.config import load_config
from lorastudy.serving import export as X
from lorastudy.serving.build import build_engines, merged_model, synthetic_adapters
from lorastudy.serving.heads import StackedHeads, logit_diff
from lorastudy.serving.vllm_bench import heads_mode
from lorastudy.serving.worker import WorkerClient, WorkerError, WorkerUnavailable

TARGETS = ["q_proj", "v_proj"]
FAKE = Path(__file__).parent / "fake_vllm" / "vllm"


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(None)
    base, tok = M.load_base(cfg.model, 2, seed=0)
    adapters = synthetic_adapters(base, 3, targets=TARGETS, seed=1, num_labels={"two": 2, "three": 3},
                                  tasks=["two", "three"])
    return base.eval(), adapters


def _batch(n=5, s=9, pad_id=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (n, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = pad_id
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def fake_site(root: Path, version: str) -> Path:
    """A directory holding the fake ``vllm`` package and its metadata (the version vLLM's switch reads)."""
    site = root / f"site-{version}"
    if not site.exists():
        shutil.copytree(FAKE, site / "vllm")
        meta = site / f"vllm-{version}.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return site


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """Import the fake vllm in this process: ``fake_vllm(version)`` -> the imported module."""
    def use(version: str):
        for m in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            monkeypatch.delitem(sys.modules, m)
        monkeypatch.syspath_prepend(str(fake_site(tmp_path, version)))
        importlib.invalidate_caches()
        return importlib.import_module("vllm")
    yield use
    for m in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[m]


# -- export ------------------------------------------------------------------------------------------------------
def test_strip_head_keeps_backbone_lora_and_returns_the_head(tiny, tmp_path):
    from peft import PeftModel
    from peft.utils import ModulesToSaveWrapper
    from safetensors.torch import load_file

    base, adapters = tiny
    ad = adapters[1]  # the 3-class adapter: its head differs in shape from the base's 2-class head
    saved = X.save_adapters(base, [ad], TARGETS, tmp_path / "saved")[ad.name]
    before = load_file(saved / X.ADAPTER_WEIGHTS)
    assert "score" in json.loads((saved / X.ADAPTER_CONFIG).read_text())["modules_to_save"]
    head = X.strip_head(saved, tmp_path / "stripped")
    after = load_file(tmp_path / "stripped" / X.ADAPTER_WEIGHTS)
    lora_keys = {k for k in before if "lora_" in k}
    assert set(after) == lora_keys and lora_keys and not any("score" in k for k in after)
    for k in after:
        assert torch.equal(after[k], before[k])
    torch.testing.assert_close(head["weight"], ad.score)
    cfg = json.loads((tmp_path / "stripped" / X.ADAPTER_CONFIG).read_text())
    assert cfg["modules_to_save"] is None and cfg["task_type"] is None
    assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == TARGETS
    # a reload with PEFT on a fresh base gives the backbone-only model: LoRA in, no head wrapper, base head kept
    fresh = M.load_base(load_config(None).model, 2, seed=5)[0].eval()
    stripped = PeftModel.from_pretrained(fresh, tmp_path / "stripped").eval()
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in stripped.modules())
    torch.testing.assert_close(stripped.get_base_model().score.weight, M.load_base(load_config(None).model, 2,
                                                                                   seed=5)[0].score.weight)
    with_head = PeftModel.from_pretrained(M.load_base(load_config(None).model, 3, seed=0)[0], saved).eval()
    batch = _batch()
    last = batch["attention_mask"].sum(-1) - 1
    with torch.no_grad():
        h = M.backbone(stripped)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"]).last_hidden_state[torch.arange(5), last]
        h_ref = M.backbone(with_head)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      position_ids=batch["position_ids"]).last_hidden_state[torch.arange(5), last]
        torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=1e-6)
        # the original adapter's logits = its stripped head on the backbone-only model's hidden state
        torch.testing.assert_close(h @ head["weight"].T, M.classifier_logits(with_head, batch), atol=1e-5,
                                   rtol=1e-5)
        with stripped.disable_adapter():  # and the LoRA is really in the backbone
            h0 = M.backbone(stripped)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      position_ids=batch["position_ids"]).last_hidden_state[torch.arange(5), last]
        assert (h0 - h).abs().max() > 1e-3
    with pytest.raises(X.ExportError, match="adapter_config.json"):
        X.strip_head(tmp_path / "nowhere", tmp_path / "x")
    with pytest.raises(X.ExportError, match="modules_to_save"):
        X.strip_head(tmp_path / "stripped", tmp_path / "again")


def test_stacked_heads_match_each_adapters_own_head(tiny):
    _, adapters = tiny
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, adapters[0].score.shape[1], generator=g)
    idx = torch.tensor([0, 1, 2, 1, 0, 2, 1])
    heads = StackedHeads([a.score for a in adapters])
    out = heads(hidden, idx)
    assert out.shape == (7, 3) and heads.label_counts == [2, 3, 2]
    for i, a in enumerate(idx.tolist()):
        own = torch.nn.functional.linear(hidden[i], adapters[a].score)  # the adapter's own score layer
        torch.testing.assert_close(out[i, : adapters[a].num_labels], own)
        assert torch.isneginf(out[i, adapters[a].num_labels:]).all()  # never a phantom class
    assert (out.argmax(-1) < torch.tensor([adapters[a].num_labels for a in idx.tolist()])).all()


# -- the worker contract ----------------------------------------------------------------------------------------
WORKER = textwrap.dedent('''
    import os, sys, time
    from lorastudy.serving.worker import WorkerUnavailable, serve

    def setup(spec):
        print("library noise on stdout")  # must not reach the channel
        os.write(1, b"raw fd-1 noise\\n")
        print("a log line", file=sys.stderr)
        if spec["mode"] == "unavailable":
            raise WorkerUnavailable("no engine here")
        if spec["mode"] == "broken":
            raise RuntimeError("cannot build the engine")
        if spec["mode"] == "slow":  # a long engine start (vLLM: 50-76 s)
            time.sleep(60)
        def add(a, b):
            return {"sum": a + b}
        def crash():
            print("dying now", file=sys.stderr)
            os._exit(3)
        def sleep(s):
            time.sleep(s)
            return {}
        def fail():
            raise ValueError("bad input row 3")
        return {"engine": "fake", "n": spec["n"]}, {"add": add, "crash": crash, "sleep": sleep, "fail": fail}

    sys.exit(serve(setup))
''')


def _worker(tmp_path, mode, label="w"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    spec = tmp_path / f"{mode}.json"
    spec.write_text(json.dumps({"mode": mode, "n": 7}))
    return WorkerClient([sys.executable, str(script), str(spec)], label)


def test_worker_contract_round_trip_and_failures(tmp_path):
    w = _worker(tmp_path, "ok").start()
    assert w.wait_ready(60) == {"engine": "fake", "n": 7}  # the noise printed to fd 1 did not break the channel
    assert w.request("add", a=2, b=3) == {"sum": 5}
    with pytest.raises(WorkerError, match="bad input row 3") as e:
        w.request("fail")
    assert "Traceback" in str(e.value)
    w.close()
    w = _worker(tmp_path, "ok").start()
    w.wait_ready(60)
    with pytest.raises(WorkerError, match=r"exited \(code 3\)") as e:
        w.request("crash")
    assert "dying now" in str(e.value)  # the stderr tail is quoted
    w.close()
    w = _worker(tmp_path, "ok").start()
    w.wait_ready(60)
    with pytest.raises(WorkerError, match="no message within"):
        w.request("sleep", timeout=1, s=30)
    assert w.proc.poll() is not None  # killed, not left running
    w.close()
    w = _worker(tmp_path, "ok").start()
    w.wait_ready(60)
    w.close()
    assert w.proc.returncode == 0  # exit is answered and the worker ends cleanly
    w = _worker(tmp_path, "unavailable").start()
    with pytest.raises(WorkerUnavailable, match="no engine here"):
        w.wait_ready(60)
    w.close()
    w = _worker(tmp_path, "broken").start()
    with pytest.raises(WorkerError, match="cannot build the engine") as e:
        w.wait_ready(60)
    assert "a log line" in str(e.value)
    w.close()
    garbage = WorkerClient([sys.executable, "-c", "print('hello')"], "g").start()
    with pytest.raises(WorkerError, match="not a JSON line"):
        garbage.wait_ready(60)
    garbage.close()


def test_worker_ends_when_its_parent_is_killed(tmp_path):
    """A benchmark killed while its worker is still starting its engine (timeout, SIGKILL) must not leave the worker
    running (holding the GPU)."""
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "slow.json").write_text(json.dumps({"mode": "slow", "n": 1}))
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from lorastudy.serving.worker import WorkerClient
        w = WorkerClient([sys.executable, {str(script)!r}, {str(tmp_path / "slow.json")!r}], "w").start()
        time.sleep(3)  # the worker is inside its setup now
        print(w.proc.pid, flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent")


# -- the version switch and the engine on the fake vllm ------------------------------------------------------------
def test_heads_mode_by_version():
    assert heads_mode("0.26.0", [2, 2])[0] == "outside"
    assert heads_mode("0.30.9", [2, 2])[0] == "outside"
    assert heads_mode("0.31.0", [2, 2])[0] == "vllm"
    mode, why = heads_mode("0.31.2", [2, 3])
    assert mode == "outside" and "label count" in why
    assert heads_mode("0.25.1", [2])[0] is None and heads_mode(None, [2])[0] is None


def _spec(tmp_path, base, adapters, mode, heads):
    from safetensors.torch import save_file

    spec = {"dtype": "float32", "cuda_graphs": False, "max_model_len": 16, "max_num_seqs": 8,
            "kv_cache_bytes": 2**26, "gpu_memory_utilization": 0.25, "max_lora_rank": 8}
    if mode == "merged":
        return {**spec, "mode": "merged", "num_labels": adapters[0].num_labels,
                "model_dir": str(X.export_classifier(merged_model(base, adapters[0]), tmp_path / "merged"))}
    saved = X.save_adapters(base, adapters, TARGETS, tmp_path / "saved")
    spec.update(mode="adapters", heads=heads, adapters=[])
    if heads == "vllm":
        spec["model_dir"] = str(X.export_classifier(base, tmp_path / "base", adapters[0].num_labels))
        spec["adapters"] = [{"name": a.name, "num_labels": a.num_labels, "path": str(saved[a.name])}
                            for a in adapters]
        return spec
    spec["model_dir"] = str(X.export_backbone(base, tmp_path / "backbone"))
    heads_t = {}
    for i, a in enumerate(adapters):
        heads_t[f"head_{i}"] = X.strip_head(saved[a.name], tmp_path / "lora" / a.name)["weight"]
        spec["adapters"].append({"name": a.name, "num_labels": a.num_labels, "path": str(tmp_path / "lora" / a.name)})
    save_file(heads_t, tmp_path / "heads.safetensors")
    spec["heads_file"] = str(tmp_path / "heads.safetensors")
    return spec


def test_vllm_engine_outside_heads_026_matches_merged(tiny, tmp_path, fake_vllm):
    vllm = fake_vllm("0.26.0")
    from lorastudy.serving.vllm_engine import VllmEngine

    base, adapters = tiny
    eng = build_engines(base, adapters, TARGETS, ["merged"], "cpu", torch.float32)["merged"]
    eng.set_fused(False)
    batch, idx = _batch(), torch.tensor([0, 1, 2, 1, 0])
    ve = VllmEngine(_spec(tmp_path, base, adapters, "adapters", "outside"))
    kw = vllm.CALLS[-1]
    assert kw["convert"] == "embed" and kw["enable_prefix_caching"] is False and kw["max_loras"] == 3
    assert kw["pooler_config"].use_activation is False
    assert logit_diff(ve(batch, idx), eng(batch, idx)) < 1e-5  # 2- and 3-class rows, -inf in the same places
    # the adapters as saved (with their heads) are refused by 0.26, as real vLLM does
    bad = _spec(tmp_path / "b", base, adapters, "adapters", "vllm")
    with pytest.raises(ValueError, match="modules_to_save"):
        VllmEngine(bad)(batch, idx)
    merged = VllmEngine(_spec(tmp_path, base, adapters, "merged", None))
    zeros = torch.zeros(5, dtype=torch.long)  # one merged model (2 classes): its own width
    assert logit_diff(merged(batch, zeros), eng(batch, zeros)[:, :2]) < 1e-5


def test_vllm_engine_heads_in_vllm_031(tiny, tmp_path, fake_vllm):
    fake_vllm("0.31.0")
    from lorastudy.serving.vllm_engine import VllmEngine

    base, adapters = tiny
    same = [adapters[0], adapters[2]]  # both 2-class: vLLM >= 0.31 serves their saved heads
    eng = build_engines(base, same, TARGETS, ["merged"], "cpu", torch.float32)["merged"]
    eng.set_fused(False)
    batch, idx = _batch(), torch.tensor([0, 1, 1, 0, 1])
    ve = VllmEngine(_spec(tmp_path, base, same, "adapters", "vllm"))
    assert ve.task == "classify"
    assert logit_diff(ve(batch, idx), eng(batch, idx)) < 1e-5


def test_benchmark_runs_vllm_rows_through_worker_processes(tiny, tmp_path, monkeypatch):
    """The whole vllm path on CPU: probe, version switch, export, two worker processes speaking the contract,
    interleaved timing, parity, H2 in vLLM, mixed traffic; adapters with 2 and 3 classes."""
    from lorastudy.serving.benchmark import overhead_analysis, run_benchmark

    base, adapters = tiny
    monkeypatch.setenv("PYTHONPATH", str(fake_site(tmp_path, "0.26.0")))
    logs = []
    res = run_benchmark(base, adapters, targets=TARGETS, engines=("merged", "peft", "batched", "vllm"),
                        batch_sizes=(2,), seq_len=8, warmup=1, requests=2, eager_requests=2, repeats=2,
                        log=logs.append)
    assert res["vllm"]["status"] == "ran" and res["vllm"]["heads"] == "outside", res["vllm"]
    assert res["vllm"]["workers"]["vllm"]["label_counts"] == [2, 3, 2]
    rec = {(r["engine"], r["batch_size"], r["n_adapters"]): r for r in res["records"]}
    assert ("merged-vllm", 2, 1) in rec
    for k in (1, 2, 3):
        assert len(rec[("vllm", 2, k)]["repeat_mean_ms"]) == 2
    assert rec[("vllm", 2, 3)]["mixing"] == "in rotation" and rec[("vllm", 2, 2)]["mixing"] == "mixed in batch"
    assert "LLM.encode" in rec[("vllm", 2, 1)]["includes"]
    assert res["parity_max_abs_logit_diff"]["vllm"] < 1e-4 and res["parity_max_abs_logit_diff"]["merged-vllm"] < 1e-4
    assert res["vllm_parity"]["pass"] and res["vllm_parity"]["reference"] == "peft"
    assert "A (vLLM): merged per task" in res["mixed_traffic"][0]
    ov = overhead_analysis(res["records"], n_boot=100)
    assert {r["reference"] for r in ov["rows"] if r["engine"] == "vllm"} == {"merged-vllm"}
    assert ov["H2_vllm"]["engine"] == "vllm" and ov["H2_vllm"]["per_batch_size"]
    assert len(ov["vllm_vs_batched"]) == 1


def test_a_vllm_worker_dying_mid_run_drops_only_the_vllm_rows(tiny, tmp_path, monkeypatch):
    from lorastudy.serving.benchmark import run_benchmark

    base, adapters = tiny
    monkeypatch.setenv("PYTHONPATH", str(fake_site(tmp_path, "0.26.0")))
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "4")  # parity (1 call) and a few timed calls, then exit(7)
    logs = []
    res = run_benchmark(base, adapters, targets=TARGETS, engines=("merged", "batched", "vllm"), batch_sizes=(2,),
                        seq_len=8, warmup=1, requests=2, repeats=2, log=logs.append)
    assert res["vllm"]["status"] == "failed" and "timing at batch size 2" in res["vllm"]["stage"]
    assert "exited (code 7)" in res["vllm"]["error"]
    engines = {r["engine"] for r in res["records"]}
    assert engines == {"merged", "batched"} and "vllm" not in res["parity_max_abs_logit_diff"]
    assert res["mixed_traffic"] and "A (vLLM): merged per task" not in res["mixed_traffic"][0]
    assert any("vllm rows are dropped" in m for m in logs)
