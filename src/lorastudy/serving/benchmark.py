"""Phase 4B / RQ2: serving benchmark — merged models vs multi-adapter engines, in-process and in vLLM.

Scenarios, per batch size:
- ``merged`` per task (one adapter per batch): the baseline;
- k = 1..N adapters per batch (rows assigned round-robin; when k exceeds the batch size, k calls serve the
  adapters in rotation), for ``peft``, ``batched`` and ``vllm`` (and ``merged``, whose model copies each serve their
  rows: on GPU each adapter's sub-batch is padded to a captured size and replayed as a CUDA graph, so the baseline
  stays on its serving path);
- mixed traffic: a stream of requests for the tasks, served (A) by one merged model per task with single-task
  batches, or (B) by one base + adapters with mixed batches; both also in vLLM.
``merged`` and ``batched`` run their serving path (fused projections and norms, and on GPU CUDA-graph replay of
static shapes); on GPU, ``-eager`` rows run HF's plain modules without graphs beside them. ``vllm`` and
``merged-vllm`` run in worker processes (``vllm_bench``). Every engine is timed per call with one host clock until
its logits are on the host, repeats interleaved in time (``timing``); overhead, its CI and H2: ``analysis``.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lorastudy import modeling as M
from lorastudy import store
from lorastudy.config import ConfigError
from lorastudy.serving.analysis import overhead_analysis
from lorastudy.serving.build import build_engines, study_adapters, synthetic_adapters, synthetic_base
from lorastudy.serving.engines import GraphRunner, SplitRunner
from lorastudy.serving.heads import logit_diff
from lorastudy.serving.timing import LocalCondition, RemoteCondition, interleave, latency
from lorastudy.serving.vllm_bench import ADAPTERS, MERGED, VllmOptions, VllmRun
from lorastudy.serving.worker import WorkerError

__all__ = ["overhead_analysis", "run_benchmark", "run_serve_bench"]


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


def adapter_counts(n: int) -> list[int]:
    return sorted({1, 2, 3, n} & set(range(1, n + 1))) if n > 4 else list(range(1, n + 1))


def slot_calls(b: int, k: int) -> tuple[str, list[list[int]]]:
    """(mixing, per call the adapter index of each row) for k adapters at batch size b.

    k <= b: one call, rows round-robin over the k adapters ("mixed in batch"; k = 1: "single adapter"). k > b: a
    batch cannot hold k adapters, so k calls serve the adapters in rotation, each covering every adapter b times
    over the cycle ("in rotation")."""
    if k <= b:
        return ("single adapter" if k == 1 else "mixed in batch"), [[i % k for i in range(b)]]
    return "in rotation", [[(j * b + i) % k for i in range(b)] for j in range(k)]


def _mem_kind(device: torch.device) -> str:
    return ("weights + peak activations (torch.cuda.max_memory_allocated during warm-up)" if device.type == "cuda"
            else "weights only (activations are not measured on CPU)")


CALL_INCLUDES = {
    "merged": "copy of the token ids into the captured buffers and CUDA-graph replay of the merged model's forward "
              "(a batch mixing adapters: each adapter's rows gathered, padded to a captured size, replayed, "
              "scattered back); logits to the host",
    "batched": "copy of the token ids and adapter indices into the captured buffers and CUDA-graph replay of the "
               "forward with gathered LoRA and heads; logits to the host",
    "eager": "the forward on HF's plain modules, launched from Python; logits to the host",
    "cpu": "the forward in PyTorch on the CPU",
    "vllm": "one LLM.encode on token-id prompts: vLLM's scheduler, input preparation, forward, LAST pooling and the "
            "pooled rows to the host (plus, with heads outside vLLM, the gathered head matmul on the host)",
}


def _includes(label: str, graph: bool, device: torch.device) -> str:
    if label.startswith("vllm") or label.endswith("-vllm"):
        return CALL_INCLUDES["vllm"]
    if device.type != "cuda":
        return CALL_INCLUDES["cpu"]
    if not graph:
        return CALL_INCLUDES["eager"]
    return CALL_INCLUDES["merged" if label.startswith("merged") else "batched"]


def _ways(e: str, graphs_ok: bool, fuse: bool, single: bool) -> list[tuple[str, bool, bool]]:
    """(label, CUDA graph, fused) per way of running engine ``e`` on a condition (``single``: one adapter per
    call). On GPU merged and batched run their graphs and, beside them, HF's plain modules (merged's eager rows only
    where a call serves one adapter: the baseline's shape)."""
    if graphs_ok and e in ("merged", "batched"):
        return [(e, True, fuse)] + ([(f"{e}-eager", False, False)] if e == "batched" or single else [])
    return [(e, False, fuse if e != "peft" else False)]


def _n_conditions(engines, batch_sizes, n_adapters: int, graphs_ok: bool, fuse: bool, vllm: bool) -> int:
    """How many conditions the benchmark times (for the progress bar)."""
    n = 0
    for b in batch_sizes:
        for k in adapter_counts(n_adapters):
            single = all(len(set(x)) == 1 for x in slot_calls(b, k)[1])
            n += sum(len(_ways(e, graphs_ok, fuse, single)) for e in engines) + vllm
        n += vllm  # merged-vllm
    return n


def _local_conditions(eng: dict, b: int, batch: dict, device, graphs_ok: bool, fuse: bool, n_graph: int,
                      n_eager: int, sizes, N: int, weights: dict, log) -> list[LocalCondition]:
    """Every in-process condition of one batch size (engines x adapter counts x ways of running)."""
    conds = []
    for k in adapter_counts(N):
        mixing, idx_lists = slot_calls(b, k)
        idx = [torch.tensor(x, device=device) for x in idx_lists]
        present = [sorted(set(x)) for x in idx_lists]
        for e, engine in eng.items():
            for label, use_graph, fused in _ways(e, graphs_ok, fuse, all(len(p) == 1 for p in present)):
                engine.set_fused(fused)
                calls, graph, extra = [], use_graph, {}
                try:
                    calls = _calls(engine, e, batch, idx, present, use_graph, sizes, extra)
                except Exception as ex:  # capture can fail (data-dependent host syncs): keep eager numbers
                    if not use_graph:
                        raise
                    log(f"serve-bench: CUDA graph capture failed for {e} (b={b}, k={k}): {type(ex).__name__}")
                    label, graph = f"{e}-nograph", False
                    calls = _calls(engine, e, batch, idx, present, False, sizes, extra)
                fields = {"engine": label, "cuda_graph": graph, "fused": fused, "n_adapters": k, "mixing": mixing,
                          "distinct_in_batch": max(len(p) for p in present), "batch_size": b,
                          "weights_bytes": weights[e], "includes": _includes(label, graph, device), **extra}
                conds.append(LocalCondition(fields, n_graph if graph else n_eager, calls, device,
                                            set_mode=functools.partial(engine.set_fused, fused)))
    return conds


def _calls(engine, e: str, batch: dict, idx: list, present: list, graph: bool, sizes, extra: dict) -> list:
    """Zero-argument calls for one condition (one per call of the rotation)."""
    if not graph:
        return [functools.partial(engine, batch, i, p) for i, p in zip(idx, present, strict=True)]
    if e == "batched":
        runner = GraphRunner(engine, batch, idx[0], present[0])
        return [functools.partial(runner, batch, i, p) for i, p in zip(idx, present, strict=True)]
    calls = []  # merged: a graph per model (one adapter) or a split runner (several adapters in the batch)
    for i, p in zip(idx, present, strict=True):
        if len(p) == 1:
            calls.append(functools.partial(GraphRunner(engine, batch, i, p), batch, None, p))
        else:
            split = SplitRunner(engine, batch, i, sizes, make_runner=GraphRunner)
            extra["rows_computed"] = split.padded_rows
            calls.append(functools.partial(split, batch))
    return calls


def _record(c, blks: list[np.ndarray], seq_len: int, dtype, device, mem_kind: str, peak: int | None) -> dict:
    lat = latency(blks)
    return {**c.fields, "seq_len": seq_len, **lat, "throughput_rps": float(c.fields["batch_size"] * 1e3 /
                                                                             lat["latency_ms"]["mean"]),
            "peak_memory_bytes": peak, "memory_kind": mem_kind, "dtype": str(dtype), "device": str(device)}


def eager_calls(requests: int, eager_requests: int | None) -> int:
    """Timed calls of a row without CUDA graphs: ``eager_requests`` (None: as many as ``requests``), at most
    ``requests``."""
    return min(eager_requests or requests, requests)


def run_benchmark(base, adapters, *, targets, engines=("merged", "peft", "batched"), batch_sizes=(1, 2, 4, 8, 16),
                  seq_len: int = 64, warmup: int = 100, requests: int = 1000, eager_requests: int | None = None,
                  repeats: int = 10, cuda_graphs: bool = True, fuse: bool = True,
                  device: str | torch.device = "cpu", vllm: VllmOptions | None = None, progress=None,
                  log=print, done: dict[int, list[dict]] | None = None,
                  on_batch_size: Callable[[int, list[dict]], None] | None = None,
                  done_traffic: dict[int, dict] | None = None,
                  on_traffic: Callable[[int, dict], None] | None = None) -> dict:
    """Time every engine per batch size and number of adapters mixed in a batch (``timing``: one host clock for
    every engine, repeats interleaved in time).

    Labels: ``merged`` / ``batched`` run the serving path (fused projections and norms when ``fuse``, CUDA-graph
    replay on GPU; ``merged`` with a batch mixing adapters pads each adapter's sub-batch to a captured size); on GPU,
    ``-eager`` rows run HF's plain modules without graphs, like ``peft``; ``vllm`` / ``merged-vllm`` are vLLM with
    the adapters / with the merged model (``vllm_bench``; skipped with a message when vLLM is not importable).
    ``max_abs_logit_diff`` is against ``merged`` on HF's plain modules, on one mixed batch.

    Resuming: ``done`` maps a batch size to its records from an earlier pass (not timed again: a batch size's
    conditions are interleaved with each other, not with other batch sizes', so they stand alone);
    ``on_batch_size(b, records)`` gets each batch size's records (without raw samples) once timed, for a caller that
    checkpoints them. The mixed-traffic scenarios likewise: ``done_traffic`` maps a batch size to its entry from an
    earlier pass, ``on_traffic(b, entry)`` gets each once timed. Returns ``resumed_batch_sizes`` and
    ``resumed_traffic_batch_sizes`` (those taken from ``done`` and ``done_traffic``)."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    eager_requests = eager_calls(requests, eager_requests)
    names = [e for e in engines if e != "vllm"]
    base = base.to(dtype=dtype).eval()
    vocab, N = base.config.vocab_size, len(adapters)
    graphs_ok = cuda_graphs and device.type == "cuda"
    mdt = dtype if device.type == "cuda" else None
    gen = torch.Generator().manual_seed(0)
    # every engine gets the same token-id batches (generated up front; vLLM workers get them in their spec)
    vb = random_batch(vocab, max(8, N), seq_len, device, gen, mdt)
    vidx = (torch.arange(vb["input_ids"].shape[0]) % N).to(device)
    batches = {b: random_batch(vocab, b, seq_len, device, gen, mdt) for b in batch_sizes}
    traffic = traffic_plan(adapters, batch_sizes, requests, vocab, seq_len, device, gen, mdt)
    vsetup = vrun = None
    if "vllm" in engines:
        opts = vllm or VllmOptions()
        opts = dataclasses.replace(opts, cuda_graphs=opts.cuda_graphs and device.type == "cuda")
        vsetup = _start_vllm(base, adapters, targets, vb, vidx, batches, traffic, batch_sizes, requests,
                             seq_len, dtype, opts, log)
    try:
        eng = build_engines(base, adapters, targets, names, device, dtype, fuse=fuse)
        weights = {k: _weights_bytes(v) for k, v in eng.items()}
        # parity on one mixed batch (every adapter present when the batch allows), against merged on HF's modules
        parity: dict[str, float | None] = {}
        ref = peft_ref = None
        if "merged" in eng:
            eng["merged"].set_fused(False)
            ref = eng["merged"](vb, vidx)
        for e, engine in eng.items():
            ways = [(e, fuse if e != "peft" else False)]
            if graphs_ok and e in ("merged", "batched"):
                ways.append((f"{e}-eager", False))
            for label, fused in ways:
                engine.set_fused(fused)
                out = engine(vb, vidx)
                parity[label] = logit_diff(out, ref) if ref is not None else None
                if e == "peft":
                    peft_ref = out
        vllm_parity = None
        if vsetup is not None and vsetup.ready():  # the workers started while the engines above were built
            vrun = vsetup
            try:
                vllm_parity = _vllm_parity(vrun, vidx, ref, peft_ref, parity, adapters, dtype)
            except WorkerError as e:
                vrun = _drop_vllm(vsetup, e, "parity", [], parity, log)
        records: list[dict] = []
        mem_kind = _mem_kind(device)
        sizes = sorted(batch_sizes)
        # a resumed batch size is taken only when it has vLLM rows exactly when this pass runs vLLM (a pass whose
        # vLLM was skipped or failed must not keep another pass's vLLM rows, nor lack them when vLLM runs now)
        has_vllm = {b: any(r["engine"] in (ADAPTERS, MERGED) for r in done[b]) for b in batch_sizes
                    if done and b in done}
        if again := sorted(b for b, v in has_vllm.items() if v != (vrun is not None)):
            log(f"serve-bench: batch sizes {again} were measured {'with' if vrun is None else 'without'} vLLM rows; "
                "timing them again")
        done = {b: done[b] for b, v in has_vllm.items() if v == (vrun is not None)}
        if progress is not None:
            progress.set_total(_n_conditions(list(eng), [b for b in batch_sizes if b not in done], N, graphs_ok,
                                             fuse, vrun is not None))
        for b in batch_sizes:
            if b in done:
                records += [dict(r) for r in done[b]]
                continue
            conds = _local_conditions(eng, b, batches[b], device, graphs_ok, fuse, requests,
                                      eager_requests, sizes, N, weights, log)
            if vrun is not None:
                conds += _vllm_conditions(vrun, b, N, requests, eager_requests, device)
            step = progress.advance_rows if progress is not None else None
            try:
                timed = interleave(conds, repeats, warmup, step)
            except WorkerError as e:  # keep the other engines' rows: time this batch size again without vLLM
                vrun = _drop_vllm(vsetup, e, f"timing at batch size {b}", records, parity, log)
                conds = [c for c in conds if isinstance(c, LocalCondition)]
                timed = interleave(conds, repeats, warmup, step)
            new = [_record(c, blks, seq_len, dtype, device, mem_kind if isinstance(c, LocalCondition) else "",
                           c.fields["weights_bytes"] + c.activation_bytes if isinstance(c, LocalCondition) else None)
                   for c, blks in zip(conds, timed, strict=True)]
            records += new
            if on_batch_size is not None:
                on_batch_size(b, [{k: v for k, v in r.items() if k != "_samples"} for r in new])
        for e in ("merged", "batched"):
            if e in eng:
                eng[e].set_fused(fuse)
        try:
            mixed = mixed_traffic(eng, traffic, device, graphs_ok, vrun, done_traffic, on_traffic)
            if vrun is not None:
                _vllm_memory(vrun, records)
        except WorkerError as e:
            vrun = _drop_vllm(vsetup, e, "mixed traffic", records, parity, log)
            mixed = mixed_traffic(eng, traffic, device, graphs_ok, None, done_traffic, on_traffic)
    finally:
        if vsetup is not None:
            vsetup.close()
    for r in records:
        r["max_abs_logit_diff"] = parity.get(r["engine"])
    return {"records": records, "parity_max_abs_logit_diff": parity, "vllm_parity": vllm_parity,
            "mixed_traffic": mixed, "n_adapters_total": N, "adapters": [a.name for a in adapters],
            "label_counts": {a.name: a.num_labels for a in adapters}, "dtype": str(dtype), "fused": fuse,
            "device": str(device), "repeats": repeats,
            "timer": "host clock per call, from the call until its logits are on the host (every engine alike); "
                     "repeats interleaved in time",
            "memory_kind": mem_kind, "vllm": vsetup.status if vsetup is not None else None,
            "resumed_batch_sizes": sorted(done),
            "resumed_traffic_batch_sizes": sorted(m["batch_size"] for m in mixed if m.get("resumed")),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def traffic_plan(adapters, batch_sizes, requests: int, vocab: int, seq_len: int, device, gen, mdt) -> list[dict]:
    """Per batch size, a random stream of requests over the tasks (one adapter per task) and how each scenario
    serves it: (A) a queue per task, full single-task batches (leftovers as a final partial batch); (B) consecutive
    requests in arrival order, adapters mixed."""
    tasks = sorted({a.task for a in adapters})
    per_task = [next(i for i, a in enumerate(adapters) if a.task == t) for t in tasks]
    rng = np.random.default_rng(0)
    out = []
    for b in batch_sizes:
        n_req = max(requests, 4 * b)
        stream = rng.choice(per_task, size=n_req)
        batches_a = []
        for a in per_task:
            rows = int((stream == a).sum())
            batches_a += [(a, min(b, rows - s)) for s in range(0, rows, b)]
        out.append({"batch_size": b, "requests": n_req, "tasks": tasks, "per_task": per_task,
                    "pool": random_batch(vocab, b, seq_len, device, gen, mdt), "batches_a": batches_a,
                    "idx_b": [stream[s: s + b].tolist() for s in range(0, n_req, b)]})
    return out


TRAFFIC_PASSES = 3  # timed passes over each stream (after one warm-up pass); the median is reported
TRAFFIC_A_VLLM = "A (vLLM): merged per task"  # (its presence in an entry: the pass that timed it ran vLLM)


def mixed_traffic(eng: dict, traffic: list[dict], device, graphs: bool = False, vrun=None,
                  done: dict[int, dict] | None = None, on_batch_size=None) -> list[dict]:
    """The traffic scenarios timed per batch size, passes interleaved in time: (A) merged models, (B) the batched
    engine, both on their serving path (CUDA graphs when ``graphs``: a partial batch is padded to the static batch
    size, as a graph server would); with vLLM, the same two scenarios in vLLM (A served by one merged engine, which
    stands in for one per task: their shapes and costs are identical, and vLLM holds one engine per process).
    ``done``: entries of an earlier pass per batch size, taken (marked ``resumed``) when they have vLLM scenarios
    exactly when this pass has ``vrun``; ``on_batch_size(b, entry)`` gets each entry timed here."""
    local = "merged" in eng and "batched" in eng
    if not local and vrun is None:
        return []
    out = []
    for t in traffic:
        b, pool = t["batch_size"], t["pool"]
        old = (done or {}).get(b)
        if old is not None and (TRAFFIC_A_VLLM in old) == (vrun is not None):
            out.append({**old, "resumed": True})
            continue
        conds, names = [], []
        if local:
            if graphs:
                runners = {a: GraphRunner(eng["merged"], pool, torch.full((b,), a, device=device), [a])
                           for a in t["per_task"]}
                runner_b = GraphRunner(eng["batched"], pool, torch.zeros(b, dtype=torch.long, device=device))
                calls_a = [functools.partial(runners[a], pool, None, [a]) for a, _ in t["batches_a"]]
                calls_b = [functools.partial(runner_b, pool, torch.tensor(i + i[:1] * (b - len(i)), device=device))
                           for i in t["idx_b"]]  # pad rows: any valid adapter
            else:
                calls_a = [functools.partial(eng["merged"], {k: v[:n] for k, v in pool.items()},
                                             torch.full((n,), a, device=device), [a]) for a, n in t["batches_a"]]
                calls_b = [functools.partial(eng["batched"], {k: v[: len(i)] for k, v in pool.items()},
                                             torch.tensor(i, device=device)) for i in t["idx_b"]]
            conds += [LocalCondition({}, TRAFFIC_PASSES, calls_a, device, unit="all"),
                      LocalCondition({}, TRAFFIC_PASSES, calls_b, device, unit="all")]
            names += ["A: merged per task", "B: base + adapters, mixed"]
        if vrun is not None:
            conds += [RemoteCondition({}, TRAFFIC_PASSES, vrun, MERGED, f"traffic-A-b{b}"),
                      RemoteCondition({}, TRAFFIC_PASSES, vrun, ADAPTERS, f"traffic-B-b{b}")]
            names += [TRAFFIC_A_VLLM, "B (vLLM): base + adapters, mixed"]
        res = {}
        for name, blks in zip(names, interleave(conds, TRAFFIC_PASSES, 1), strict=True):
            ms = float(np.median(np.concatenate(blks)))
            nb = len(t["batches_a"]) if name.startswith("A") else len(t["idx_b"])
            res[name] = {"total_ms": ms, "throughput_rps": float(t["requests"] * 1e3 / ms), "batches": nb,
                         "mean_batch_latency_ms": ms / nb, "weights_bytes": None}
        if local:
            res["A: merged per task"]["weights_bytes"] = _weights_bytes(eng["merged"].models[0]) * len(t["per_task"])
            res["B: base + adapters, mixed"]["weights_bytes"] = _weights_bytes(eng["batched"])
        out.append({"batch_size": b, "requests": t["requests"], "tasks": t["tasks"], "cuda_graphs": graphs, **res})
        if on_batch_size is not None:
            on_batch_size(b, out[-1])
    return out


def _start_vllm(base, adapters, targets, vb, vidx, batches, traffic, batch_sizes, requests,
                seq_len, dtype, opts: VllmOptions, log) -> VllmRun:
    """The vLLM workers with every condition they will time (the same token-id batches as the other engines)."""
    N = len(adapters)
    rows0 = [i for i, a in enumerate(vidx.tolist()) if a == 0]
    data = {"parity": vb, "parity0": {k: v[rows0] for k, v in vb.items()}}
    conds = {}
    for b in batch_sizes:
        data[f"b{b}"] = batches[b]
        for k in adapter_counts(N):
            conds[f"b{b}-k{k}"] = {"worker": ADAPTERS, "unit": "call",
                                   "calls": [{"batch": f"b{b}", "rows": b, "idx": x} for x in slot_calls(b, k)[1]]}
        conds[f"b{b}-k1-merged"] = {"worker": MERGED, "unit": "call",
                                    "calls": [{"batch": f"b{b}", "rows": b, "idx": [0] * b}]}
    for t in traffic:
        b = t["batch_size"]
        data[f"pool{b}"] = t["pool"]
        conds[f"traffic-A-b{b}"] = {"worker": MERGED, "unit": "all", "calls": [
            {"batch": f"pool{b}", "rows": n, "idx": [0] * n} for _, n in t["batches_a"]]}
        conds[f"traffic-B-b{b}"] = {"worker": ADAPTERS, "unit": "all", "calls": [
            {"batch": f"pool{b}", "rows": len(i), "idx": i} for i in t["idx_b"]]}
    run = VllmRun(base, adapters, targets, data, conds, seq_len, max(max(batch_sizes), vb["input_ids"].shape[0]),
                  dtype, opts, log, capture_tokens=sorted({b * seq_len for b in batch_sizes}))
    run.start()
    return run


def _vllm_conditions(vrun: VllmRun, b: int, N: int, requests: int, eager_requests: int,
                     device) -> list[RemoteCondition]:
    graphs = vrun.opts.cuda_graphs
    n = requests if graphs else eager_requests
    common = {"cuda_graph": graphs, "fused": None, "batch_size": b, "weights_bytes": None,
              "includes": CALL_INCLUDES["vllm"], "heads": vrun.status.get("heads")}
    conds = [RemoteCondition({**common, "engine": MERGED, "n_adapters": 1, "mixing": "single adapter",
                              "distinct_in_batch": 1, "heads": "vllm"}, n, vrun, MERGED, f"b{b}-k1-merged")]
    for k in adapter_counts(N):
        mixing, idx_lists = slot_calls(b, k)
        conds.append(RemoteCondition({**common, "engine": ADAPTERS, "n_adapters": k, "mixing": mixing,
                                      "distinct_in_batch": max(len(set(x)) for x in idx_lists)},
                                     n, vrun, ADAPTERS, f"b{b}-k{k}"))
    return conds


def _padded(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([r + [float("-inf")] * (width - len(r)) for r in rows])


def _vllm_parity(vrun: VllmRun, vidx, ref, peft_ref, parity: dict, adapters, dtype) -> dict:
    """vLLM's logits on the parity batch against merged on HF's modules, and its probabilities against PEFT's
    (the reference for correctness; merged on HF's modules when PEFT is not run). Tolerance: 1e-4 in float32; in
    bf16, twice the largest probability difference between PEFT and merged on HF's modules on the same batch (two
    correct bf16 implementations), and at least 0.02."""
    idx = vidx.tolist()
    width = max(a.num_labels for a in adapters)
    out = _padded(vrun.request(ADAPTERS, "logits", batch="parity", idx=idx)["logits"], width)
    rows0 = [i for i, a in enumerate(idx) if a == 0]
    merged = _padded(vrun.request(MERGED, "logits", batch="parity0", idx=[0] * len(rows0))["logits"], width)
    ref_c = ref.float().cpu() if ref is not None else None
    target = (peft_ref if peft_ref is not None else ref).float().cpu()
    parity[ADAPTERS] = logit_diff(out, ref_c) if ref_c is not None else None
    parity[MERGED] = logit_diff(merged, ref_c[rows0]) if ref_c is not None else None

    def prob_diff(a, b):
        return float((torch.softmax(a, -1) - torch.softmax(b, -1)).abs().max())

    d, dm = prob_diff(out, target), prob_diff(merged, target[rows0])
    floor = prob_diff(peft_ref.float().cpu(), ref_c) if peft_ref is not None and ref_c is not None else 0.0
    tol = 1e-4 if dtype == torch.float32 else max(0.02, 2 * floor)
    return {"reference": "peft" if peft_ref is not None else "merged (HF modules)", "rows": len(idx),
            "max_abs_prob_diff": d, "merged_vllm_max_abs_prob_diff": dm, "peft_vs_merged_hf_prob_diff": floor,
            "tolerance": tol, "pass": bool(d <= tol and dm <= tol),
            "rule": "float32: 1e-4; bf16: max(0.02, 2 x the PEFT vs merged-on-HF-modules probability difference on "
                    "the same batch)"}


def _drop_vllm(vsetup: VllmRun, err: Exception, stage: str, records: list[dict], parity: dict, log) -> None:
    """A vLLM worker failed mid-run: record why, close the workers, drop every vLLM row (the other engines' rows
    stay). Returns None (the caller's vLLM run is over)."""
    log(f"serve-bench: a vLLM worker failed during {stage}; the vllm rows are dropped:\n{err}")
    vsetup.status = {**vsetup.status, "status": "failed", "stage": stage, "error": str(err)}
    vsetup.close()
    records[:] = [r for r in records if r["engine"] not in (ADAPTERS, MERGED)]
    for k in (ADAPTERS, MERGED):
        parity.pop(k, None)
    return None


def _vllm_memory(vrun: VllmRun, records: list[dict]) -> None:
    for label in (ADAPTERS, MERGED):
        mem = vrun.request(label, "memory")
        for r in records:
            if r["engine"] == label:
                r["peak_memory_bytes"], r["memory_kind"] = mem["peak_bytes"], mem["kind"]


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


PARTIAL = store.SERVING_PARTIAL
# partial/traffic_b<B>.json: a batch size's mixed-traffic scenarios (partial/b<B>.json: its conditions)
TRAFFIC_PREFIX = "traffic_"


def deployment_dir(cfg, extra_arch: str | None = None) -> Path:
    """Where a serving part writes: ``phase4/deployment`` for the study's adapters (or ``serve.synthetic_arch``),
    ``phase4/deployment/<arch>`` for one of ``serve.archs`` (a random-weight architecture served beside them)."""
    base = cfg.out / "phase4" / "deployment"
    return base / extra_arch if extra_arch else base


def serve_parts(cfg) -> list[str | None]:
    """The serving phase's parts in order: None (the study's adapters) and then each of ``serve.archs``."""
    return [None, *cfg.serve.archs]


def serve_identity(cfg) -> dict:
    """The serving settings a part's result and checkpoints are keyed on: ``serve`` less ``archs`` (which names
    the other parts: adding one changes nothing this part measures)."""
    return cfg.serve.model_dump(mode="json", exclude={"archs"})


def current_result(cfg, synthetic_arch: str | None = None, extra_arch: str | None = None) -> dict | None:
    """The stored ``benchmark_results.json`` of a serving part (``deployment_dir``) when it was measured for this
    config (hash) and architecture (``extra_arch``, else ``synthetic_arch``, default the config's) and, on the
    study's own adapters, on exactly the complete LoRA runs there are now; else None: the serving phase's "already
    done" test."""
    path = deployment_dir(cfg, extra_arch) / "benchmark_results.json"
    if not path.is_file():
        return None
    old = store.read_json(path)
    arch = extra_arch or synthetic_arch or cfg.serve.synthetic_arch
    if old.get("config_hash") != cfg.hash() or old.get("synthetic_arch") != arch:
        return None
    # the serving settings it was measured with (results written before they were recorded: not compared)
    if "serve" in old and old["serve"] != serve_identity(cfg):
        return None
    if arch is None:  # measured on the study's adapters: only if on every one there is now (a result copied from
        # a dir with fewer runs, or measured before some finished, is not current)
        from lorastudy.serving.build import complete_lora_runs

        runs = complete_lora_runs(cfg)
        want = [name for name, _, rd in runs if (rd / "adapter").exists()][: cfg.serve.max_adapters or None]
        synthetic = str(old.get("adapter_source", "")).startswith("synthetic")  # no LoRA runs then
        if not want and not synthetic and runs:
            return old  # runs whose adapters were left out (an export): nothing here to measure it against
        if (old.get("adapters") or []) != want and not (synthetic and not want):
            return None
    return old


def run_serve_bench(cfg, progress=None, log=print, synthetic_arch: str | None = None, force: bool = False,
                    extra_arch: str | None = None) -> dict:
    """Phase 4B, one part: time the serving engines (``serve.engines``) over ``serve.batch_sizes`` and adapter
    counts 1..N, then the overhead analysis (H2) and figures, into ``deployment_dir(cfg, extra_arch)``; returns the
    results (``benchmark_results.json``). The part: the study's phase-2 LoRA adapters (``synthetic_arch`` or
    ``serve.synthetic_arch``: a random-weight architecture instead), or ``extra_arch``, one of ``serve.archs``: that
    architecture with random weights and ``len(tasks) x len(seeds)`` synthetic adapters (``serve.max_adapters``
    caps it). Skips a current result unless ``force``; resumes at the batch sizes an interrupted pass finished.
    Raises ``ConfigError`` for an ``extra_arch`` not in ``serve.archs``."""
    from lorastudy import modeling as M
    from lorastudy.report import figures
    from lorastudy.training import pick_device

    s = cfg.serve
    if extra_arch is not None and extra_arch not in s.archs:
        raise ConfigError(f"serve.archs is {s.archs}: {extra_arch!r} is not one of them")
    outdir = deployment_dir(cfg, extra_arch)
    path = outdir / "benchmark_results.json"
    arch = extra_arch or synthetic_arch or s.synthetic_arch
    if not force and (old := current_result(cfg, arch, extra_arch)) is not None:
        log(f"serve-bench: {path} exists; skipping (--force to re-measure)")
        return old
    partial = outdir / PARTIAL  # one file per timed batch size: an interrupted pass loses at most one
    if force:
        shutil.rmtree(partial, ignore_errors=True)
    device = pick_device(cfg.train.device)
    n_max = s.max_adapters
    source = "synthetic"
    labels = {t: cfg.task(t).num_labels for t in cfg.tasks}  # each task's own label count (they may differ)
    if arch:
        base = synthetic_base(arch, device=device)
        # (beside the study's adapters: as many as it trains; alone: 9, three tasks x three seeds)
        n = len(cfg.tasks) * len(cfg.seeds) if extra_arch else 9
        n = min(n, n_max) if n_max else n
        adapters = synthetic_adapters(base, n, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules,
                                      num_labels=labels, tasks=cfg.tasks)
        source = f"synthetic {arch} architecture, random weights"
    else:
        tok = M.load_tokenizer(cfg.model)
        base, adapters = study_adapters(cfg, tok)
        if adapters:
            source = "phase-2 LoRA adapters"
        else:
            base, _ = M.load_base(cfg.model, 2, seed=0, tokenizer=tok)
            adapters = synthetic_adapters(base, n_max or len(cfg.tasks) * len(cfg.seeds), cfg.lora.rank,
                                          cfg.lora.alpha, cfg.lora.target_modules, num_labels=labels,
                                          tasks=cfg.tasks)
            source = f"synthetic adapters on {cfg.model.source} (no phase-2 LoRA runs found)"
        if n_max:
            adapters = adapters[:n_max]
    seq_len = s.seq_len or probe_median_length(cfg)
    # what a checkpointed batch size was measured on; any difference and it is measured again
    ident = {"config_hash": cfg.hash(), "synthetic_arch": arch, "serve": serve_identity(cfg),
             "adapters": [a.name for a in adapters], "seq_len": seq_len, "device": str(device),
             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
             "code": store.code_version(),
             # (on a CPU the machine is the hardware: its host and thread count)
             "host": None if device.type == "cuda" else [platform.node(), torch.get_num_threads()]}
    done, done_traffic = {}, {}
    files = sorted([*partial.glob("b*.json"), *partial.glob(f"{TRAFFIC_PREFIX}b*.json")]) if partial.is_dir() else []
    for f in files:
        d = store.read_json(f)
        if not isinstance(d, dict) or not isinstance(d.get("identity"), dict):
            log(f"serve-bench: {f} is not a checkpoint of this benchmark; ignored")
            continue
        if d.get("identity") == ident:
            if f.name.startswith(TRAFFIC_PREFIX):
                done_traffic[d["batch_size"]] = d["traffic"]
            else:
                done[d["batch_size"]] = d["records"]
        else:
            old = d.get("identity") or {}
            diff = sorted(k for k in {*ident, *old} if ident.get(k) != old.get(k))
            log(f"serve-bench: {f} was measured with another {', '.join(diff)}; it is timed again")
    if done or done_traffic:
        log(f"serve-bench: batch sizes {sorted(done)} (mixed traffic: {sorted(done_traffic)}) measured by an "
            f"earlier pass ({partial}); timing the rest")

    def checkpoint(b: int, records: list[dict]) -> None:
        store.atomic_write_json(partial / f"b{b}.json", {"identity": ident, "batch_size": b, "records": records})

    def checkpoint_traffic(b: int, entry: dict) -> None:
        store.atomic_write_json(partial / f"{TRAFFIC_PREFIX}b{b}.json",
                                {"identity": ident, "batch_size": b, "traffic": entry})

    res = run_benchmark(base, adapters, targets=cfg.lora.target_modules, engines=s.engines,
                        batch_sizes=s.batch_sizes, seq_len=seq_len, warmup=s.warmup, requests=s.requests,
                        eager_requests=s.eager_requests, repeats=s.repeats,
                        cuda_graphs=s.cuda_graphs, fuse=s.fuse, device=device, progress=progress, log=log,
                        vllm=VllmOptions(cuda_graphs=s.vllm_cuda_graphs, start_timeout_s=s.vllm_start_timeout_s,
                                         gpu_memory_utilization=s.vllm_gpu_memory_utilization),
                        done=done, on_batch_size=checkpoint, done_traffic=done_traffic,
                        on_traffic=checkpoint_traffic)
    ov = overhead_analysis(res["records"], seed=cfg.drift.seed, h2_max=s.h2_max_overhead, alpha=cfg.drift.alpha)
    for r in res["records"]:
        r.pop("_samples", None)  # (records of resumed batch sizes were stored without them)
    res.update(config_hash=cfg.hash(), synthetic_arch=arch, serve=serve_identity(cfg), adapter_source=source,
               model=cfg.model.source,
               warmup=s.warmup, requests=s.requests, eager_requests=eager_calls(s.requests, s.eager_requests))
    store.atomic_write_json(outdir / "overhead_analysis.json", ov)
    figures.serving_figures(res, ov, outdir, h2_max=s.h2_max_overhead)
    store.atomic_write_json(path, res)  # last: its presence marks the phase finished
    shutil.rmtree(partial, ignore_errors=True)
    return res
