"""Worker process for one vLLM configuration: ``python -m lorastudy.serving.vllm_worker SPEC_JSON``.

Speaks ``worker``'s JSON contract. The spec holds the engine's settings (``vllm_engine.VllmEngine``), the token-id
batches the benchmark uses for every engine (``batches``: name -> ``input_ids`` and ``attention_mask`` as lists) and
the timed conditions (``conditions``: id -> ``unit`` and ``calls``, each call a batch name, a row count and the
rows' adapter indices). Every call's prompts and LoRA requests are built at start, so a timed call is the engine
call alone. Commands:

- ``warm(cond, n)`` -> {}: n units untimed;
- ``time(cond, n)`` -> ``{"ms": [...]}``: n units, each timed with the host clock (``unit: "call"``: one call, the
  condition's calls taken in rotation; ``unit: "all"``: every call of the condition in order, e.g. a traffic stream);
- ``logits(batch, idx)`` -> ``{"logits": [[...], ...]}``: each row's own task's logits;
- ``memory()`` -> ``{"peak_bytes": int | null, "kind": str}``.
"""

from __future__ import annotations

import sys
import time

import torch

from lorastudy.serving.worker import WorkerUnavailable, serve


def setup(spec: dict):
    try:
        import vllm
    except ImportError as e:  # the benchmark skips the vLLM rows with this reason
        raise WorkerUnavailable(f"vLLM is not importable here ({e})") from None
    from lorastudy.serving.heads import own_logits
    from lorastudy.serving.vllm_engine import VllmEngine, token_lists

    engine = VllmEngine(spec)
    rows = {k: token_lists({n: torch.tensor(t) for n, t in b.items()}) for k, b in spec["batches"].items()}
    conds = {cid: (c["unit"], [engine.prepare(rows[x["batch"]][: x["rows"]], x["idx"]) for x in c["calls"]])
             for cid, c in spec["conditions"].items()}
    turn = dict.fromkeys(conds, 0)

    def unit(cid: str) -> None:
        kind, calls = conds[cid]
        if kind == "all":
            for p in calls:
                engine.run(p)
        else:
            engine.run(calls[turn[cid] % len(calls)])
            turn[cid] += 1

    def warm(cond: str, n: int) -> dict:
        for _ in range(n):
            unit(cond)
        return {}

    def time_(cond: str, n: int) -> dict:
        ms = []
        for _ in range(n):
            t0 = time.perf_counter()
            unit(cond)  # vLLM returns pooled rows on the host: the call has finished
            ms.append((time.perf_counter() - t0) * 1e3)
        return {"ms": ms}

    def logits(batch: str, idx: list[int]) -> dict:
        out = engine.run(engine.prepare(rows[batch][: len(idx)], idx))
        counts = engine.label_counts if engine.mode == "adapters" else [engine.num_labels] * (max(idx) + 1)
        return {"logits": [r.tolist() for r in own_logits(out, idx, counts)]}

    def memory() -> dict:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return {"peak_bytes": int(torch.cuda.max_memory_allocated()),
                    "kind": f"vLLM process, torch.cuda.max_memory_allocated: weights, KV cache "
                            f"({spec['kv_cache_bytes'] / 2**20:.0f} MiB reserved), activations"
                            + (", CUDA graphs" if spec["cuda_graphs"] else "")}
        return {"peak_bytes": None, "kind": "not measured (no GPU in the worker)"}

    info = {"vllm_version": str(getattr(vllm, "__version__", "unknown")), "mode": engine.mode,
            "heads": engine.heads_where if engine.mode == "adapters" else "vllm", "pooling_task": engine.task,
            "cuda_graphs": bool(spec["cuda_graphs"]), "label_counts": engine.label_counts}
    return info, {"warm": warm, "time": time_, "logits": logits, "memory": memory}


if __name__ == "__main__":
    sys.exit(serve(setup))
