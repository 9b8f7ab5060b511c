"""Phase 4B / RQ2: serving benchmark — merged models vs multi-adapter engines.

Scenarios, per batch size:
- ``merged`` per task (one adapter per batch): the baseline;
- k = 1..N distinct adapters mixed in every batch (rows assigned round-robin), for ``peft`` and ``batched`` (and
  ``merged``, which must split the batch across its model copies);
- mixed traffic: a stream of requests for the tasks, served (A) by one merged model per task with single-task
  batches, or (B) by one base + adapters with mixed batches.
``merged`` and ``batched`` run their serving path (fused projections and norms, and on GPU CUDA-graph replay of
static shapes); on GPU, ``-eager`` rows run HF's plain modules without graphs beside them.
Latency per batch with CUDA events (GPU) or perf_counter (CPU); warm-up first; overhead = (multi - merged) / merged
with a bootstrap 95% CI; H2: overhead <= 30%, one-sided bootstrap test per batch size, Holm-corrected.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch

from lorastudy import modeling as M
from lorastudy import stats as T
from lorastudy import store
from lorastudy.serving.build import build_engines, study_adapters, synthetic_adapters, synthetic_base
from lorastudy.serving.engines import GraphRunner


def random_batch(vocab: int, b: int, seq_len: int, device, gen: torch.Generator, dtype=None) -> dict:
    """Random token ids (no pad) with mask and position ids; with ``dtype``, also a prepared 4-D mask."""
    ids = torch.randint(3, vocab, (b, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}
    if dtype is not None:  # GPU: a prepared 4-D mask keeps the forward free of host syncs (CUDA graphs)
        out["mask4d"] = M.additive_mask_4d(out["attention_mask"], dtype)
    return out


def _weights_bytes(module) -> int:
    """Bytes of the module's parameters and buffers, each storage once (fused projections are views)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def _time(fn, warmup: int, n: int, device) -> np.ndarray:
    """Per-call latency in ms: CUDA events on GPU (no host sync inside the timed region), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return np.array([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def _lat(ms: np.ndarray) -> dict:
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99))}


def adapter_counts(n: int) -> list[int]:
    return sorted({1, 2, 3, n} & set(range(1, n + 1))) if n > 4 else list(range(1, n + 1))


def run_benchmark(base, adapters, *, targets, engines=("merged", "peft", "batched"), batch_sizes=(1, 2, 4, 8, 16),
                  seq_len: int = 64, warmup: int = 100, requests: int = 1000,
                  eager_requests: int | None = None, cuda_graphs: bool = True, fuse: bool = True,
                  device: str | torch.device = "cpu", progress=None, log=print) -> dict:
    """Time every engine per batch size and number of adapters mixed in a batch.

    Labels: ``merged`` / ``batched`` run the serving path (fused projections and norms when ``fuse``, CUDA-graph
    replay on GPU); on GPU, ``merged-eager`` / ``batched-eager`` run HF's plain modules without graphs, like
    ``peft``. ``max_abs_logit_diff`` is against ``merged`` on HF's plain modules, on one mixed batch."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = [e for e in engines if e != "vllm"]
    eng = build_engines(base, adapters, targets, names, device, dtype, fuse=fuse)
    if "vllm" in engines:
        try:
            import vllm  # noqa: F401
            log("serve-bench: vLLM is importable, but its multi-LoRA engine is not wired in yet; skipped")
        except ImportError:
            log("serve-bench: vLLM is not installed; the vllm engine is skipped")
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    N = len(adapters)
    records: list[dict] = []
    weights = {k: _weights_bytes(v) for k, v in eng.items()}
    graphs_ok = cuda_graphs and device.type == "cuda"

    def variants(e: str, one_adapter: bool) -> list[tuple[str, bool, bool]]:
        """(label, CUDA graph, fused) per way of running engine ``e``."""
        if e not in ("merged", "batched"):
            return [(e, False, False)]
        if not graphs_ok:
            return [(e, False, fuse)]
        if e == "merged" and not one_adapter:  # rows split across model copies: data-dependent, not capturable
            return [(e, False, fuse)]
        return [(e, True, fuse), (f"{e}-eager", False, False)]

    # parity on one mixed batch (every adapter present when the batch allows), against merged on HF's modules
    mdt = dtype if device.type == "cuda" else None
    vb = random_batch(vocab, max(8, N), seq_len, device, gen, mdt)
    vidx = (torch.arange(vb["input_ids"].shape[0]) % N).to(device)
    parity: dict[str, float | None] = {}
    ref = None
    if "merged" in eng:
        eng["merged"].set_fused(False)
        ref = eng["merged"](vb, vidx)
    for e, engine in eng.items():
        for label, _, fused in variants(e, True):
            engine.set_fused(fused)
            parity[label] = float((engine(vb, vidx) - ref).abs().max()) if ref is not None else None
    total = len(batch_sizes) * len(adapter_counts(N)) * len(names)
    if progress is not None:
        progress.set_total(total)
    for b in batch_sizes:
        batch = random_batch(vocab, b, seq_len, device, gen, mdt)
        conds = [(e, k) for k in adapter_counts(N) for e in names]  # merged with k=1 is the baseline
        for e, k in conds:
            idx = (torch.arange(b) % k).to(device)
            present = sorted(set(range(min(k, b))))
            for label, use_graph, fused in variants(e, len(present) == 1):
                engine = eng[e]
                engine.set_fused(fused)
                graph = False
                call = functools.partial(engine, batch, idx, present)
                if use_graph:
                    try:
                        call = functools.partial(GraphRunner(engine, batch, idx, present), batch, idx, present)
                        graph = True
                    except Exception as ex:  # capture can fail (data-dependent host syncs); keep eager numbers
                        log(f"serve-bench: CUDA graph capture failed for {e} (b={b}, k={k}): {type(ex).__name__}")
                        label = f"{e}-nograph"
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                n = requests if graph else (eager_requests or requests)
                ms = _time(call, min(warmup, n), n, device)
                act = (torch.cuda.max_memory_allocated() - before) if device.type == "cuda" else 0
                records.append({
                    "engine": label, "cuda_graph": graph, "fused": fused, "n_adapters": k,
                    "distinct_in_batch": len(present), "batch_size": b, "seq_len": seq_len, "latency_ms": _lat(ms),
                    "throughput_rps": float(b * 1e3 / ms.mean()), "peak_memory_bytes": int(weights[e] + act),
                    "weights_bytes": weights[e], "max_abs_logit_diff": parity.get(label), "dtype": str(dtype),
                    "device": str(device), "_samples": ms,
                })
            if progress is not None:
                progress.advance_rows(1)
    for e in ("merged", "batched"):
        if e in eng:
            eng[e].set_fused(fuse)
    traffic = mixed_traffic(eng, adapters, vocab, batch_sizes, seq_len, requests, device, gen, mdt, graphs_ok)
    return {"records": records, "parity_max_abs_logit_diff": parity, "mixed_traffic": traffic,
            "n_adapters_total": N, "adapters": [a.name for a in adapters], "dtype": str(dtype), "fused": fuse,
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def mixed_traffic(eng, adapters, vocab, batch_sizes, seq_len, requests, device, gen, mdt=None, graphs: bool = False
                  ) -> list[dict]:
    """A stream of requests for the tasks (one adapter per task), served (A) by merged models with single-task
    batches, (B) by the batched engine with mixed batches in arrival order. Both on their serving path (CUDA graphs
    when ``graphs``: a partial last batch is padded to the static batch size, as a graph server would)."""
    if "merged" not in eng or "batched" not in eng:
        return []
    tasks = sorted({a.task for a in adapters})
    per_task = [next(i for i, a in enumerate(adapters) if a.task == t) for t in tasks]
    rng = np.random.default_rng(0)
    out = []
    for b in batch_sizes:
        n_req = max(requests, 4 * b)
        stream = rng.choice(per_task, size=n_req)
        pool = random_batch(vocab, b, seq_len, device, gen, mdt)
        # (A) queue per task, serve full single-task batches (leftovers as a final partial batch)
        batches_a = []
        for a in per_task:
            rows = int((stream == a).sum())
            batches_a += [(a, min(b, rows - s)) for s in range(0, rows, b)]
        # (B) consecutive requests in arrival order, mixed adapters (index tensors made before timing)
        idx_b = [torch.as_tensor(stream[s: s + b], device=device) for s in range(0, n_req, b)]
        if graphs:
            runners = {a: GraphRunner(eng["merged"], pool, torch.full((b,), a, device=device), [a])
                       for a in per_task}
            runner_b = GraphRunner(eng["batched"], pool, torch.zeros(b, dtype=torch.long, device=device))
            idx_b = [torch.cat([i, i[:1].expand(b - len(i))]) for i in idx_b]  # pad rows: any valid adapter

            def serve_a(batches_a=batches_a, pool=pool, runners=runners):
                for a, _ in batches_a:
                    runners[a](pool, None, [a])

            def serve_b(idx_b=idx_b, pool=pool, runner_b=runner_b):
                for i in idx_b:
                    runner_b(pool, i)
        else:
            full = {a: torch.full((b,), a, device=device) for a in per_task}

            def serve_a(batches_a=batches_a, pool=pool, full=full):
                for a, n in batches_a:
                    eng["merged"]({k: v[:n] for k, v in pool.items()}, full[a][:n], [a])

            def serve_b(idx_b=idx_b, pool=pool):
                for i in idx_b:
                    eng["batched"]({k: v[: len(i)] for k, v in pool.items()}, i)

        res = {}
        for name, fn, nb in (("A: merged per task", serve_a, len(batches_a)),
                             ("B: base + adapters, mixed", serve_b, len(idx_b))):
            fn()  # warm-up pass
            ms = _time(fn, 0, 3, device)  # three passes over the whole stream
            res[name] = {"total_ms": float(np.median(ms)), "throughput_rps": float(n_req * 1e3 / np.median(ms)),
                         "batches": nb, "mean_batch_latency_ms": float(np.median(ms) / nb)}
        res["A: merged per task"]["weights_bytes"] = _weights_bytes(eng["merged"].models[0]) * len(per_task)
        res["B: base + adapters, mixed"]["weights_bytes"] = _weights_bytes(eng["batched"])
        out.append({"batch_size": b, "requests": n_req, "tasks": tasks, "cuda_graphs": graphs, **res})
    return out


def overhead_analysis(records: list[dict], n_boot: int = 2000, seed: int = 0, h2_max: float = 0.30,
                      alpha: float = 0.05) -> dict:
    """overhead = mean(multi) / mean(merged) - 1 per engine, batch size and adapter count (graph vs graph, eager vs
    eager; peft against eager merged), bootstrap CI over timed requests; H2 one-sided per batch size."""
    rng = np.random.default_rng(seed)
    by = {(r["engine"], r["batch_size"], r["n_adapters"]): r for r in records}

    def ref_for(engine: str) -> str:
        if engine == "batched":
            return "merged" if any(k[0] == "merged" for k in by) else "merged-eager"
        return "merged-eager" if any(k[0] == "merged-eager" for k in by) else "merged"

    rows = []
    for (e, b, k), r in sorted(by.items()):
        if e.startswith("merged"):
            continue
        ref = by.get((ref_for(e), b, 1))
        if ref is None:
            continue
        x, y = r["_samples"], ref["_samples"]
        bx = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
        byy = y[rng.integers(0, len(y), (n_boot, len(y)))].mean(1)
        boot = bx / byy - 1
        est = float(x.mean() / y.mean() - 1)
        p = float((np.sum(boot > h2_max) + 1) / (n_boot + 1))  # H0: overhead > h2_max
        rows.append({"engine": e, "reference": ref["engine"], "batch_size": b, "n_adapters": k,
                     "overhead": est, "ci95": list(T.percentile_ci(boot)), "p_one_sided_h2": p})
    # H2 on the project's engine with every adapter mixed (the hardest case), per batch size
    h2_rows = [r for r in rows if r["engine"] == "batched" and r["n_adapters"] == max(x["n_adapters"] for x in rows)] \
        if rows else []
    if not h2_rows:
        h2_rows = [r for r in rows if r["engine"] == "batched-eager"]
    fam = f"H2 over batch sizes {[r['batch_size'] for r in h2_rows]}"
    holm = T.correct([r["p_one_sided_h2"] for r in h2_rows], "holm", family=fam, alpha=alpha)
    for r, padj in zip(h2_rows, holm["adjusted"], strict=True):
        r["p_holm"] = padj
        r["decision"] = "supported" if padj < alpha else (
            "contradicted" if r["ci95"][0] > h2_max else "not supported (inconclusive)")
    verdict = None
    if h2_rows:
        verdict = "supported" if all(r["decision"] == "supported" for r in h2_rows) else (
            "contradicted" if any(r["decision"] == "contradicted" for r in h2_rows) else "not supported (inconclusive)")
    return {
        "definition": "overhead = mean latency(multi-adapter engine) / mean latency(merged, one task per batch) - 1",
        "ci": f"percentile bootstrap over timed requests, {n_boot} resamples",
        "rows": rows,
        "H2": {"hypothesis": f"multi-adapter serving costs at most {h2_max:.0%} latency over merged models",
               "engine": h2_rows[0]["engine"] if h2_rows else None,
               "test": f"one-sided bootstrap test of H0: overhead > {h2_max:.0%}, per batch size",
               "correction": "Holm over batch sizes",
               "decision_rule": f"supported when every batch size has Holm-adjusted p < {alpha}",
               "per_batch_size": h2_rows, "decision": verdict},
    }


def probe_median_length(cfg) -> int:
    """Median token length of the study's probe texts (serve.seq_len: null): timings at a realistic length, with
    the static shape that CUDA graphs need."""
    from lorastudy import data as D
    from lorastudy import modeling as M

    tok = M.load_tokenizer(cfg.model)
    lengths = []
    for task in cfg.tasks:
        probe = D.probe_set(D.splits_for(cfg, task), cfg.data.probe_size)
        lengths += D.encode(tok, probe, cfg.task(task), cfg.data).lengths().tolist()
    return int(np.median(lengths))


def run_serve_bench(cfg, progress=None, log=print, synthetic_arch: str | None = None, force: bool = False) -> dict:
    from lorastudy import modeling as M
    from lorastudy.report import figures
    from lorastudy.training import pick_device

    s = cfg.serve
    outdir = cfg.out / "phase4" / "deployment"
    path = outdir / "benchmark_results.json"
    arch = synthetic_arch or s.synthetic_arch
    if path.is_file() and not force:
        old = store.read_json(path)
        if old.get("config_hash") == cfg.hash() and old.get("synthetic_arch") == arch:
            log(f"serve-bench: {path} exists; skipping (--force to re-measure)")
            return old
    device = pick_device(cfg.train.device)
    n_max = s.max_adapters
    source = "synthetic"
    if arch:
        base = synthetic_base(arch, device=device)
        adapters = synthetic_adapters(base, n_max or 9, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules,
                                      tasks=cfg.tasks)
        source = f"synthetic {arch} architecture, random weights"
    else:
        tok = M.load_tokenizer(cfg.model)
        base, adapters = study_adapters(cfg, tok)
        if adapters:
            source = "phase-2 LoRA adapters"
        else:
            base, _ = M.load_base(cfg.model, 2, seed=0, tokenizer=tok)
            adapters = synthetic_adapters(base, n_max or len(cfg.tasks) * len(cfg.seeds), cfg.lora.rank,
                                          cfg.lora.alpha, cfg.lora.target_modules, tasks=cfg.tasks)
            source = f"synthetic adapters on {cfg.model.source} (no phase-2 LoRA runs found)"
        if n_max:
            adapters = adapters[:n_max]
    seq_len = s.seq_len or probe_median_length(cfg)
    res = run_benchmark(base, adapters, targets=cfg.lora.target_modules, engines=s.engines,
                        batch_sizes=s.batch_sizes, seq_len=seq_len, warmup=s.warmup, requests=s.requests,
                        eager_requests=s.eager_requests,
                        cuda_graphs=s.cuda_graphs, fuse=s.fuse, device=device, progress=progress, log=log)
    ov = overhead_analysis(res["records"], seed=cfg.drift.seed, h2_max=s.h2_max_overhead, alpha=cfg.drift.alpha)
    for r in res["records"]:
        r.pop("_samples")
    res.update(config_hash=cfg.hash(), synthetic_arch=arch, adapter_source=source, model=cfg.model.source,
               warmup=s.warmup, requests=s.requests, eager_requests=s.eager_requests or s.requests)
    store.atomic_write_json(outdir / "overhead_analysis.json", ov)
    figures.serving_figures(res, ov, outdir)
    store.atomic_write_json(path, res)  # last: its presence marks the phase finished
    return res
