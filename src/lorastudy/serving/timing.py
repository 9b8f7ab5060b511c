"""Timing of serving conditions: one clock for every engine, repeats interleaved in time.

- One clock: a call is timed on the host from the call until its logits are on the host (``.cpu()`` of the
  result, which waits for the GPU). vLLM returns pooled rows on the host, so every engine, in-process or in a worker
  process, is timed to the same end point.
- Repeats interleaved: each condition's timed calls are split into R blocks; block r of every condition of a batch
  size runs before block r + 1 of any, in an order rotated each repeat. Slow drift of the machine (clocks,
  temperature, other load) then falls on every condition alike, and the overhead CI resamples repeats (paired
  across conditions), not single calls (``stats.paired_ratio_bootstrap``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch


def wall_ms(fn: Callable) -> float:
    """Milliseconds from calling ``fn`` until its result (a tensor, or anything already on the host) is on the
    host."""
    t0 = time.perf_counter()
    out = fn()
    if isinstance(out, torch.Tensor):
        out.cpu()
    return (time.perf_counter() - t0) * 1e3


class Condition:
    """One timed condition: ``n`` timed units in total; ``warm(n)`` and ``time(n) -> ms per unit``. ``fields``:
    what the benchmark record says about it (engine label, batch size, adapters, ...)."""

    def __init__(self, fields: dict, n: int):
        self.fields, self.n = fields, int(n)
        self.activation_bytes = 0

    def warm(self, n: int) -> None:
        raise NotImplementedError

    def time(self, n: int) -> np.ndarray:
        raise NotImplementedError


class LocalCondition(Condition):
    """An in-process engine. ``calls``: zero-argument callables taken in rotation (adapters in rotation, or one
    call); ``unit="all"``: one unit runs every call in order (a traffic stream, each batch's logits brought to the
    host). ``set_mode`` runs before each block (e.g. the engine's fused/plain switch, shared by conditions)."""

    def __init__(self, fields: dict, n: int, calls: list[Callable], device: torch.device, unit: str = "call",
                 set_mode: Callable | None = None):
        super().__init__(fields, n)
        self.calls, self.device, self.unit, self.set_mode = calls, device, unit, set_mode
        self._turn = 0

    def _unit(self):
        if self.unit == "all":
            for c in self.calls:
                out = c()
                if isinstance(out, torch.Tensor):
                    out.cpu()
            return None
        out = self.calls[self._turn % len(self.calls)]()
        self._turn += 1
        return out

    def warm(self, n: int) -> None:
        if self.set_mode:
            self.set_mode()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        for _ in range(max(1, n)):
            wall_ms(self._unit)
        if cuda:  # activations of one call (graph replays allocate nothing: their pools are reserved at capture)
            self.activation_bytes = int(torch.cuda.max_memory_allocated() - before)

    def time(self, n: int) -> np.ndarray:
        if self.set_mode:
            self.set_mode()
        return np.array([wall_ms(self._unit) for _ in range(n)])


class RemoteCondition(Condition):
    """A condition served by a worker process (``vllm_bench.VllmRun``): its calls were sent in the worker's spec
    and are timed there with the same clock."""

    def __init__(self, fields: dict, n: int, run, worker: str, cid: str):
        super().__init__(fields, n)
        self.run, self.worker, self.cid = run, worker, cid

    def warm(self, n: int) -> None:
        self.run.request(self.worker, "warm", cond=self.cid, n=max(1, n))

    def time(self, n: int) -> np.ndarray:
        return np.asarray(self.run.request(self.worker, "time", cond=self.cid, n=n)["ms"], float)


def blocks(n: int, repeats: int) -> list[int]:
    """Sizes of the blocks that split ``n`` calls into ``min(repeats, n)`` near-equal repeats."""
    r = max(1, min(repeats, n))
    return [len(x) for x in np.array_split(np.arange(n), r)]


def interleave(conds: list[Condition], repeats: int, warmup: int,
               on_block: Callable[[float], None] | None = None) -> list[list[np.ndarray]]:
    """Warm every condition (``min(warmup, n)`` units), then time repeat after repeat, each condition's block r in
    an order rotated by r. Returns per condition its list of blocks (ms per unit). ``on_block(fraction)`` is called
    after each timed block with the fraction of its condition it was (a progress bar advances by conditions, and
    with blocks interleaved every condition ends only in the last repeat)."""
    for c in conds:
        c.warm(min(warmup, c.n))
    sizes = [blocks(c.n, repeats) for c in conds]
    out: list[list[np.ndarray]] = [[] for _ in conds]
    for r in range(max(len(s) for s in sizes)):
        for j in [(i + r) % len(conds) for i in range(len(conds))]:
            if r < len(sizes[j]):
                out[j].append(conds[j].time(sizes[j][r]))
                if on_block is not None:
                    on_block(1.0 / len(sizes[j]))
    return out


def latency(blks: list[np.ndarray]) -> dict:
    """Mean/p50/p95/p99 over every timed unit, and each repeat's mean (the units the overhead CI resamples)."""
    ms = np.concatenate(blks)
    return {"latency_ms": {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
                           "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99))},
            "repeat_mean_ms": [float(b.mean()) for b in blks], "timed_calls": int(ms.size), "_samples": ms}
