"""A small process pool for independent units of work (training runs, tuning workers).

One process per unit, at most N alive, spread round-robin over the visible GPUs (several per GPU allowed). A unit
that raises or whose process dies is reported as failed with its error; the others go on. With one worker and no
GPU spreading needed, units run in this process (no start-up cost).

``streams > 1``: each process runs that many units at once, one thread and one CUDA stream each. Why: processes on
one GPU are time-sliced (without MPS their kernels never overlap), so once a run's step is a CUDA-graph replay that
keeps the GPU busy, more processes add little; graphs replayed on several streams of one process do overlap
(measured in benchmarks/train_step.py, part ``workers``).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class UnitResult:
    name: str
    ok: bool
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class _Slot:
    name: str
    proc: Any
    conn: Any
    t0: float
    extra: dict = field(default_factory=dict)


# Runs per process on a GPU when --streams is not given; chosen from the worker-scaling curve measured on the H200
# (benchmarks/results/RESULTS.md, "worker scaling").
DEFAULT_GPU_STREAMS = 8


def default_streams(streams: int | None, train_device: str = "auto") -> int:
    """``--streams`` as given, else 8 when runs will train on a GPU (``train.device``), 1 otherwise."""
    if streams is not None:
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        return streams
    return DEFAULT_GPU_STREAMS if visible_gpus() and train_device != "cpu" else 1


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


def _child(conn, fn, arg, device, threads):
    if device is not None:
        os.environ["LORASTUDY_DEVICE"] = device
    import torch

    torch.set_num_threads(threads)  # share the CPU cores between workers instead of oversubscribing them
    try:
        conn.send(("ok", fn(arg, device)))
    except BaseException as e:  # report, never hang the parent
        conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
    finally:
        conn.close()


def run_threads(chunk: list[tuple[str, Any]], device: str | None, fn: Callable[[Any, str | None], Any]
                ) -> list[UnitResult]:
    """Run the units of ``chunk`` at once, one thread each, each on its own CUDA stream when there is a GPU."""
    import torch

    results: list[UnitResult | None] = [None] * len(chunk)

    def one(i: int, name: str, arg: Any) -> None:
        t0 = time.perf_counter()
        try:
            if torch.cuda.is_available():
                dev = torch.device(device or "cuda")
                with torch.cuda.device(dev), torch.cuda.stream(torch.cuda.Stream(dev)):
                    value = fn(arg, device)
            else:
                value = fn(arg, device)
            results[i] = UnitResult(name, True, value, seconds=time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - reported per unit, the other threads go on
            results[i] = UnitResult(name, False, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)

    # daemon threads joined with a timeout: Ctrl-C / SIGINT reaches the main thread and ends the process (a trial
    # left RUNNING is then recovered as an orphan on the next start) instead of waiting for every run to finish
    threads = [threading.Thread(target=one, args=(i, n, a), name=f"unit-{n}", daemon=True)
               for i, (n, a) in enumerate(chunk)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
    return [r for r in results if r is not None]


def _chunk_fn(chunk, device, fn):
    return run_threads(chunk, device, fn)


def run_units(units: list[tuple[str, Any]], fn: Callable[[Any, str | None], Any], workers: int = 1,
              progress=None, stop: Callable[[], bool] | None = None, streams: int = 1,
              on_start: Callable[[int], None] | None = None) -> list[UnitResult]:
    """Run ``fn(arg, device)`` for each ``(name, arg)``. ``device`` is "cuda:i" or None (the config decides).

    ``workers`` processes, each running ``streams`` units at once (threads, one CUDA stream each); ``on_start(pid)``
    is called for each worker process started. ``stop()`` is checked between units (time budgets): units not
    started are left for a later invocation. An interrupt (Ctrl-C, SIGTERM turned into one) ends the workers."""
    if streams > 1:
        # units are dealt round-robin into chunks of `streams`; one chunk = one unit of the process pool
        n_chunks = max(1, -(-len(units) // streams))
        chunks = [units[i::n_chunks] for i in range(n_chunks)]
        named = [("+".join(n for n, _ in c), c) for c in chunks]
        out: list[UnitResult] = []
        for r in run_units(named, functools.partial(_chunk_fn, fn=fn), workers, progress, stop, on_start=on_start):
            if r.ok:
                out += r.value
            else:  # the process died: every unit of its chunk failed with it
                out += [UnitResult(n, False, error=r.error, seconds=r.seconds) for n, _ in dict(named)[r.name]]
        return out
    ngpu = visible_gpus()
    results: list[UnitResult] = []
    if workers <= 1 and ngpu <= 1:
        for name, arg in units:
            if stop is not None and stop():
                break
            if progress:
                progress.start(name)
            t0 = time.perf_counter()
            try:
                r = UnitResult(name, True, fn(arg, None))
            except Exception as e:
                r = UnitResult(name, False, error=f"{type(e).__name__}: {e}")
            r.seconds = time.perf_counter() - t0
            results.append(r)
            if progress:
                progress.finish(name, r.ok)
        return results

    ctx = mp.get_context("spawn")
    pending = list(units)
    alive: list[_Slot] = []
    try:
        _pool_loop(ctx, pending, alive, fn, workers, ngpu, progress, stop, results, on_start)
    except BaseException:
        # Ctrl-C / SIGTERM of this process: end the workers before the caller cleans up after them (a worker left
        # running would hold its trials and the GPU past the interrupt)
        for slot in alive:
            slot.proc.terminate()
        for slot in alive:
            slot.proc.join(timeout=30)
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join()
        raise
    return results


def _pool_loop(ctx, pending, alive, fn, workers, ngpu, progress, stop, results, on_start) -> None:
    k = 0
    while pending or alive:
        while pending and len(alive) < workers and not (stop is not None and stop()):
            name, arg = pending.pop(0)
            device = f"cuda:{k % ngpu}" if ngpu else None
            k += 1
            parent, child = ctx.Pipe(duplex=False)
            threads = max(1, (os.cpu_count() or 1) // workers)
            p = ctx.Process(target=_child, args=(child, fn, arg, device, threads), daemon=False)
            p.start()
            child.close()
            if on_start:
                on_start(p.pid)
            alive.append(_Slot(name, p, parent, time.perf_counter()))
            if progress:
                progress.start(name)
        if stop is not None and stop():
            pending.clear()
        for slot in list(alive):
            msg = None
            if slot.conn.poll():
                try:
                    msg = slot.conn.recv()
                except EOFError:
                    msg = None
            if msg is None and slot.proc.is_alive():
                continue
            slot.proc.join(timeout=30)
            if msg is None:
                msg = ("err", f"worker process died (exit code {slot.proc.exitcode})")
            r = UnitResult(slot.name, msg[0] == "ok", msg[1] if msg[0] == "ok" else None,
                           msg[1] if msg[0] != "ok" else None, time.perf_counter() - slot.t0)
            results.append(r)
            alive.remove(slot)
            if progress:
                progress.finish(slot.name, r.ok)
        time.sleep(0.05)
