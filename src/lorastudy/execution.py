"""Where and how work runs: devices, worker processes, runs as threads on CUDA streams, fused groups, signals.

The one home of concurrency in lorastudy. Everything that decides where a run executes lives here and is passed
down explicitly as a ``Context`` (never through environment variables):

* devices: ``resolve_device(train.device, ctx)``;
* the process-wide locks (``INIT_LOCK``: seeding and building a model, so that a run's initial weights come from
  its own seed whatever other threads draw; ``CAPTURE_LOCK``: CUDA-graph captures) and the count of runs training
  in this process (the scope of ``peak_memory_bytes``);
* the process pool (``run_units``): one process per unit, at most N alive, spread round-robin over the visible
  GPUs; ``streams > 1`` runs that many units per process at once, one thread and one CUDA stream each. Why streams:
  processes on one GPU are time-sliced (without MPS their kernels never overlap), while CUDA graphs replayed on
  several streams of one process do overlap (benchmarks/train_step.py, part ``workers``);
* fused groups (fused.py): phase 2's runs planned into groups by the critical path (``plan_groups``), phase 1's
  trials fed to one group per method (``tune_fused``), each group a thread on its own CUDA stream;
* signals: SIGTERM handled like Ctrl-C (``sigterm_as_interrupt``); while runs train, SIGTERM/SIGINT ask them to
  write their checkpoints at the next step boundary first (``checkpoint_on_signal``, checkpoint.py); and leaving at
  once when run threads are still inside torch calls (``exit_if_threads_alive``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# -- locks and the runs of this process --------------------------------------------------------------------------
INIT_LOCK = threading.RLock()  # seeding + building a model (and counting the runs of this process)
CAPTURE_LOCK = threading.Lock()  # CUDA-graph captures are serialised; each captures in "thread_local" mode
_ACTIVE = {"runs": 0}  # runs training in this process now (guarded by INIT_LOCK)


@dataclass(frozen=True)
class Context:
    """Where a unit of work runs. ``device``: the GPU the pool gave this worker ("cuda:i"), or None (the config's
    ``train.device`` decides); ``worker``: the worker's number."""

    device: str | None = None
    worker: int = 0


def resolve_device(spec: str, ctx: Context | None = None):
    """``train.device`` -> torch.device. ``auto`` = CUDA when available; a worker's GPU (``ctx.device``) replaces
    ``auto`` and a bare ``cuda``, not an explicit ``cuda:N`` or ``cpu``."""
    import torch

    if spec in ("auto", "cuda") and ctx is not None and ctx.device:
        return torch.device(ctx.device)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


@contextlib.contextmanager
def active_run(device):
    """Count a run (or a fused group) training in this process while inside. The first one resets the CUDA
    peak-memory counter, so that with several at once ``peak_memory_bytes`` covers all of them (scope "process")."""
    import torch

    with INIT_LOCK:
        _ACTIVE["runs"] += 1
        alone = _ACTIVE["runs"] == 1
    if device.type == "cuda" and alone:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        with INIT_LOCK:
            _ACTIVE["runs"] -= 1


# -- signals ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (``timeout``, a scheduler's cancel) ends the work like Ctrl-C does (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _interrupt_now(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        _INTERRUPT.clear()


# A checkpoint request: SIGTERM/SIGINT while runs are training asks them to write their checkpoints at the next
# step boundary and stop (checkpoint.Policy reads it); the process then exits as on Ctrl-C (130).
_INTERRUPT = threading.Event()


def interrupt_requested() -> bool:
    """Whether SIGTERM/SIGINT asked the runs of this process to checkpoint and stop (see ``checkpoint_on_signal``)."""
    return _INTERRUPT.is_set()


def request_interrupt() -> None:
    """Ask every run of this process to write its checkpoint at its next step boundary and stop."""
    _INTERRUPT.set()


def clear_interrupt() -> None:
    _INTERRUPT.clear()


# Starting new work and an interrupt's clean-up exclude each other. A fused group asks for tuning trials from its
# own (daemon) thread, which goes on while the main thread handles SIGTERM; a trial it created after the clean-up
# had looked for running trials would stay RUNNING in the study (seen in CI). The clean-up calls stop_new_work()
# first: an ask in progress finishes (and its trial is then found), later ones see the stop and start nothing.
_NEW_WORK = threading.Lock()
_NO_NEW_WORK = threading.Event()
NEW_WORK_WAIT_S = 30.0  # an ask is a few storage calls; past this the clean-up goes on without the lock


@contextlib.contextmanager
def new_work():
    """Hold while starting a unit of work the interrupt's clean-up must see (e.g. asking for a trial and labelling
    it); yields False once ``stop_new_work`` was called: start nothing then."""
    with _NEW_WORK:
        yield not _NO_NEW_WORK.is_set()


def stop_new_work() -> None:
    """No new work in this process from now on; returns once a start in progress (``new_work``) has finished."""
    got = _NEW_WORK.acquire(timeout=NEW_WORK_WAIT_S)
    try:
        _NO_NEW_WORK.set()
    finally:  # (a second Ctrl-C here must not leave the lock held: every later ask would block)
        if got:
            _NEW_WORK.release()


def allow_new_work() -> None:
    """Undo ``stop_new_work`` (a command starting again in the same process, e.g. in tests)."""
    _NO_NEW_WORK.clear()


def _interrupt_now(signum: int) -> None:
    """Raise the interrupt of a signal, the request set first: a KeyboardInterrupt that a signal handler raises
    while a finalizer runs (a weakref callback of SQLAlchemy's, a ``__del__``) is printed as "Exception ignored" and
    lost (seen in CI: a tune worker then went on with its trials). The loops that start or continue work check
    the request (``fit``, tune workers, the process pool), so a lost one still stops them."""
    _INTERRUPT.set()
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def checkpoint_on_signal():
    """SIGTERM and SIGINT (Ctrl-C, ``timeout``, a scheduler's or a preemptible VM's notice) while runs train: each
    run writes its checkpoint at its next step boundary and stops, then the process exits 130 as today
    (``KeyboardInterrupt`` raised where the runs stop). With no run training, or on a second signal, the
    interrupt is raised at once. Main thread only (elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        with INIT_LOCK:
            training = _ACTIVE["runs"] > 0
        if training and not _INTERRUPT.is_set():
            _INTERRUPT.set()
            print(f"signal {signum}: writing checkpoints at the next step boundary, then stopping (signal again to "
                  "stop at once)", file=sys.stderr, flush=True)
            return
        _interrupt_now(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    _INTERRUPT.clear()
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _INTERRUPT.clear()


def exit_if_threads_alive(code: int) -> None:
    """After an interrupt: runs in threads (``--streams``, fused groups) are daemon threads that cannot be stopped
    from outside; what they did is already safe (finished work on disk, their trials marked failed by ``tune``), so
    when any is still inside a torch call end the process at once with ``code``: interpreter shutdown beside such
    threads can hang (seen in CI). Returns when no such thread is alive."""
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.daemon and t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
        os._exit(code)


# -- the process pool -------------------------------------------------------------------------------------------
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


def _child(conn, fn, arg, ctx: Context, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # share the CPU cores between workers instead of oversubscribing them
    interrupted = False
    try:
        with checkpoint_on_signal():  # the parent's terminate() (SIGTERM): checkpoint at a step boundary, stop
            try:
                value = fn(arg, ctx)
            finally:
                interrupted = interrupt_requested()  # (leaving checkpoint_on_signal clears the request)
        conn.send(("ok", value))
    except BaseException as e:  # report, never hang the parent
        interrupted = interrupted or isinstance(e, KeyboardInterrupt)
        conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
    finally:
        conn.close()
        if interrupted:
            # runs' daemon threads may still be inside torch calls: interpreter shutdown beside them can hang until
            # the parent's join times out (30 s; seen once as test_sigterm_stops_parallel_tune_and_frees_its_trials
            # [processes_x_threads_group_signal] taking 30.2 s), so leave at once
            exit_if_threads_alive(130)


def run_threads(chunk: list[tuple[str, Any]], ctx: Context | None, fn: Callable[[Any, Context], Any],
                urgent: int = 0) -> list[UnitResult]:
    """Run the units of ``chunk`` at once, one thread each, each on its own CUDA stream when there is a GPU.

    ``urgent``: the first that many units get high-priority streams (the GPU's block scheduler starts their kernels
    first when SMs free up). Measured for SST-2's two phase-2 groups side by side (train_step.py --phase2-urgent):
    no change, their steps are bound by the rate at which the GPU takes kernels, not by SMs; so train-all does not
    use it."""
    import torch

    ctx = ctx or Context()
    results: list[UnitResult | None] = [None] * len(chunk)
    high = -5  # torch maps a priority beyond the device's range to its highest (lower numbers run first)

    def one(i: int, name: str, arg: Any) -> None:
        t0 = time.perf_counter()
        try:
            if torch.cuda.is_available():
                dev = torch.device(ctx.device or "cuda")
                stream = torch.cuda.Stream(dev, priority=high if i < urgent else 0)
                with torch.cuda.device(dev), torch.cuda.stream(stream):
                    value = fn(arg, ctx)
            else:
                value = fn(arg, ctx)
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
    if interrupt_requested():  # the runs wrote their checkpoints and stopped: now stop the process (exit 130)
        raise KeyboardInterrupt("checkpointed after a signal")
    return [r for r in results if r is not None]


def _chunk_fn(chunk, ctx, fn):
    return run_threads(chunk, ctx, fn)


def run_units(units: list[tuple[str, Any]], fn: Callable[[Any, Context], Any], workers: int = 1,
              progress=None, stop: Callable[[], bool] | None = None, streams: int = 1,
              on_start: Callable[[int], None] | None = None) -> list[UnitResult]:
    """Run ``fn(arg, ctx)`` for each ``(name, arg)``; ``ctx`` (a Context) names the GPU the unit was given.

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
            if interrupt_requested():
                raise KeyboardInterrupt("checkpointed after a signal")
            if progress:
                progress.start(name)
            t0 = time.perf_counter()
            try:
                r = UnitResult(name, True, fn(arg, Context()))
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
        if interrupt_requested():  # a signal whose KeyboardInterrupt was lost (``_interrupt_now``)
            raise KeyboardInterrupt("interrupted")
        while pending and len(alive) < workers and not (stop is not None and stop()):
            name, arg = pending.pop(0)
            unit_ctx = Context(device=f"cuda:{k % ngpu}" if ngpu else None, worker=k)
            k += 1
            parent, child = ctx.Pipe(duplex=False)
            threads = max(1, (os.cpu_count() or 1) // workers)
            p = ctx.Process(target=_child, args=(child, fn, arg, unit_ctx, threads), daemon=False)
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


# -- fused groups -----------------------------------------------------------------------------------------------
# A run is "long" (on the critical path) when it plans at least this fraction of the longest run's steps: it gets
# a small group of its own (the seeds of its task x method) so that its per-step latency stays near a lone run's.
LONG_FRACTION = 0.5


def fuse_enabled(cfg, ctx: Context | None = None) -> bool:
    """``train.fuse``: on / off, or auto = on when runs train on a CUDA device on the fast path (not with
    ``train.fast_step=eager``, the plain reference path)."""
    spec = cfg.train.fuse
    if spec in ("on", "off"):
        return spec == "on"
    return resolve_device(cfg.train.device, ctx).type == "cuda" and cfg.train.fast_step not in ("eager", "static")


@dataclass
class PlannedRun:
    """A phase-2 run and its planned optimizer steps (the length of its chain of sequential steps)."""

    name: str
    task: str
    method: str
    seed: int
    hp: Any  # training.HParams
    steps: int

    @property
    def key(self) -> tuple:
        return self.task, self.method, tuple(sorted(asdict(self.hp).items()))


def planned_steps(n_train: int, hp) -> int:
    """Optimizer steps a run plans: ``ceil(epochs x ceil(n_train / batch_size))``, capped at ``hp.max_steps``
    (the schedule's length; early stopping may end it sooner)."""
    total = math.ceil(hp.epochs * math.ceil(n_train / hp.batch_size))
    return min(total, hp.max_steps) if hp.max_steps else total


def plan_groups(cfg, runs: list[PlannedRun], max_runs: int) -> list[list[PlannedRun]]:
    """Fused groups for phase 2, scheduled by the critical path: a run is a chain of sequential steps, so the
    longest runs bound the wall time by their per-step latency. Long runs (>= LONG_FRACTION of the longest) get
    small groups of identical runs (one task x method x hyperparameters: its seeds, one shape and one evaluation
    schedule); the other runs of a method (and label count) are packed into wide groups of at most ``max_runs``,
    longest first. Groups are returned longest first: started first."""
    if not runs:
        return []
    longest = max(r.steps for r in runs)
    by_kind: dict[tuple, list[PlannedRun]] = {}
    for r in sorted(runs, key=lambda r: (-r.steps, r.name)):
        by_kind.setdefault((r.method, cfg.task(r.task).num_labels), []).append(r)
    groups: list[list[PlannedRun]] = []
    for rs in by_kind.values():
        same: dict[tuple, list[PlannedRun]] = {}
        short = []
        for r in rs:
            if r.steps >= LONG_FRACTION * longest:
                same.setdefault(r.key, []).append(r)
            else:
                short.append(r)
        for g in same.values():
            groups += [g[i: i + max_runs] for i in range(0, len(g), max_runs)]
        groups += [short[i: i + max_runs] for i in range(0, len(short), max_runs)]
    return sorted(groups, key=lambda g: -max(r.steps for r in g))


def _lone_fallback(cfg, method: str) -> str | None:
    """Why ``method`` cannot be fused for this model (None: it can). Checked on a meta-device copy of the model."""
    from lorastudy import fused

    return fused.unfusable_reason(cfg, method)


def _phase2_jobs(cfg, group: list[PlannedRun], progress, results: list) -> list:
    from lorastudy import checkpoint, store
    from lorastudy.fused import RunJob
    from lorastudy.training import save_run, write_failed

    jobs = []
    for r in group:
        final = store.run_dir(cfg.out, r.task, r.method, r.seed)
        t0 = time.perf_counter()

        def done(m, r=r, final=final, t0=t0):
            model = m.pop("_model", None)
            tok = m.pop("_tokenizer", None)
            save_run(cfg, r.method, m, model, final, tok)
            results.append(UnitResult(r.name, True, {"test": m["test"][m["primary_metric"]],
                                                     "collapsed": m["collapsed"]}, seconds=time.perf_counter() - t0))
            if progress is not None:
                progress.finish(r.name, True)

        def fail(e, r=r, final=final, t0=t0):
            write_failed(cfg, final, r.task, r.method, r.seed, r.hp, e)
            results.append(UnitResult(r.name, False, error=f"{type(e).__name__}: {e}",
                                      seconds=time.perf_counter() - t0))
            if progress is not None:
                progress.finish(r.name, False)

        def pause(path, r=r, t0=t0):  # the time budget stopped it mid-run: the next invocation resumes it
            results.append(UnitResult(r.name, True, {"paused": str(path)}, seconds=time.perf_counter() - t0))
            if progress is not None:
                progress.finish(r.name, True)

        jobs.append(RunJob(r.name, r.task, r.method, r.seed, r.hp, keep_model=cfg.train.save_model, on_done=done,
                           on_fail=fail, checkpoint=checkpoint.path_for(final), on_pause=pause))
    return jobs


def _phase2_group(arg, ctx: Context) -> list[UnitResult]:
    """One fused group of phase-2 runs (in the thread and on the stream the pool gave it)."""
    from lorastudy import fused
    from lorastudy.checkpoint import RunPaused
    from lorastudy.store import run_dir
    from lorastudy.training import run_and_save

    cfg, group, stop, progress, log = arg
    device = resolve_device(cfg.train.device, ctx)
    results: list[UnitResult] = []
    jobs = _phase2_jobs(cfg, group, progress, results)
    source = fused.ListSource(jobs, stop)
    reason = _lone_fallback(cfg, group[0].method)
    if reason is not None:
        if cfg.train.fuse == "on":
            raise fused.FusionError(reason)
        log(f"train-all: {reason}; training these runs one by one")
        while (job := source.next()) is not None:
            t0 = time.perf_counter()
            try:
                m = run_and_save(cfg, job.task, job.method, job.seed, job.hp, run_dir(cfg.out, job.task, job.method,
                                                                                       job.seed), ctx=ctx, stop=stop)
                results.append(UnitResult(job.name, True, {"test": m["test"][m["primary_metric"]],
                                                           "collapsed": m["collapsed"]},
                                          seconds=time.perf_counter() - t0))
            except RunPaused as e:  # the time budget stopped it mid-run (checkpoint written)
                results.append(UnitResult(job.name, True, {"paused": str(e.path)}, seconds=time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001 - reported per run
                results.append(UnitResult(job.name, False, error=f"{type(e).__name__}: {e}"))
        return results
    if progress is not None:
        for r in group:
            progress.start(r.name)
    try:
        with active_run(device):
            g = fused.FusedGroup(cfg, group[0].method, cfg.task(group[0].task).num_labels, len(group),
                                 max(r.hp.batch_size for r in group), device=device,
                                 dropout=any(r.hp.lora_dropout > 0 for r in group), log=log)
            g.run(source, stop)  # a failure of the whole group fails its running runs (on_fail) and is raised
    except Exception as e:  # noqa: BLE001 - the runs it never started fail with it (no FAILED.json: never ran)
        for job in source.jobs:
            results.append(UnitResult(job.name, False, error=f"not started, its fused group failed: "
                                                             f"{type(e).__name__}: {e}"))
        if not results:
            raise
    return results


def _groups_unit(arg, ctx: Context) -> list[UnitResult]:
    """The fused groups one process runs, at once: one thread and CUDA stream each. (A high-priority stream for the
    longest group, ``run_threads(urgent=1)``, was measured to shorten nothing: benchmarks/results/fused_adamw_h200.)"""
    groups = arg
    out: list[UnitResult] = []
    for r in run_threads(groups, ctx, _phase2_group):
        if r.ok:
            out += r.value
        else:  # the group itself failed (out of memory, a bug): its runs that reported nothing failed with it
            out.append(UnitResult(r.name, False, error=r.error, seconds=r.seconds))
    return out


def train_fused(cfg, units: list[tuple[str, tuple]], *, workers: int = 1, progress=None,
                stop: Callable[[], bool] | None = None, log=print) -> list[UnitResult]:
    """Phase 2 in fused groups: ``units`` as pipeline.train_all makes them (name, (cfg, task, method, seed,
    hp overrides)). Groups are planned by ``plan_groups`` and dealt, longest first, round-robin over ``workers``
    processes (one per GPU); each process trains its groups at once, one thread and CUDA stream each. Returns one
    result per run."""
    from lorastudy import data as D
    from lorastudy.training import HParams

    runs = []
    for name, (_, task, method, seed, hp_over) in units:
        hp = HParams.from_config(cfg, method, hp_over)
        runs.append(PlannedRun(name, task, method, seed, hp, planned_steps(len(D.splits_for(cfg, task).train), hp)))
    groups = plan_groups(cfg, runs, cfg.train.fuse_max_runs)
    if not groups:
        return []
    here = workers <= 1 and visible_gpus() <= 1  # in this process: the stop check, progress and log can be shared
    named = [(f"group{i}[" + ",".join(r.name for r in g) + "]",
              (cfg, g, stop if here else None, progress if here else None, log if here else print))
             for i, g in enumerate(groups)]
    n_proc = max(1, min(workers, len(named)))
    chunks = [named[w::n_proc] for w in range(n_proc)]
    pool_units = [("+".join(n for n, _ in c), c) for c in chunks]
    out: list[UnitResult] = []
    for r in run_units(pool_units, _groups_unit, n_proc, stop=stop):
        if r.ok:
            out += r.value
        else:  # the process died: every run of its groups failed with it
            names = [run.name for _, a in dict(pool_units)[r.name] for run in a[1]]
            out += [UnitResult(n, False, error=r.error, seconds=r.seconds) for n in names]
    return out


def _tune_group(arg, ctx: Context) -> int:
    """One fused group of one method (and label count) taking trials from its studies (tuning.TrialSource)."""
    from lorastudy import fused
    from lorastudy.tuning import TrialSource, n_complete

    cfg, pairs, worker, stop, on_trial, slots, log = arg
    method = pairs[0][1]
    device = resolve_device(cfg.train.device, ctx)
    source = TrialSource(cfg, pairs, worker, stop=stop, on_trial=on_trial, ctx=ctx)
    sp = cfg.search.spaces[method]
    dropout = method == "lora" and ((sp.lora_dropout is not None and sp.lora_dropout.high > 0)
                                    or (sp.lora_dropout is None and cfg.lora.dropout > 0))
    before = sum(n_complete(st) for st in source.studies.values())
    with active_run(device):
        g = fused.FusedGroup(cfg, method, cfg.task(pairs[0][0]).num_labels, slots, max(sp.batch_size),
                             device=device, dropout=dropout, log=log)
        g.run(source)
    return sum(n_complete(st) for st in source.studies.values()) - before


def _tune_worker(arg, ctx: Context) -> int:
    """A tuning worker with fusion: one fused group per method (and label count) at once, each on its own thread
    and CUDA stream; then, like the plain worker loop, it waits on each study until it is complete (replacing
    trials that failed elsewhere) with the plain path."""
    from lorastudy.tuning import n_complete, run_worker

    cfg, todo, worker, stop, on_trial, log = arg
    kinds: dict[tuple, list] = {}
    for t, m in todo:
        kinds.setdefault((m, cfg.task(t).num_labels), []).append((t, m))
    groups = []
    for (m, nl), pairs in kinds.items():
        missing = sum(max(0, cfg.search.n_trials - n_complete(_study(cfg, t, m))) for t, m in pairs)
        reason = _lone_fallback(cfg, m)
        if reason is not None:
            if cfg.train.fuse == "on":
                from lorastudy.fused import FusionError

                raise FusionError(reason)
            log(f"tune: {reason}; trials of {m} run one by one")
            continue
        slots = max(1, min(cfg.train.fuse_max_runs, missing))
        groups.append((f"fused-{m}-{nl}", (cfg, pairs, worker, stop, on_trial, slots, log)))
    done = 0
    for r in run_threads(groups, ctx, _tune_group):
        if not r.ok:
            raise RuntimeError(f"{r.name}: {r.error}")
        done += r.value
    for t, m in todo:  # stragglers elsewhere, failures to replace (and the methods that could not be fused)
        done += run_worker(cfg, t, m, worker, on_trial=on_trial, stop=stop, wait=True, ctx=ctx)
    return done


def _study(cfg, task: str, method: str):
    from lorastudy.tuning import get_study

    return get_study(cfg, task, method)


def tune_fused(cfg, todo: list[tuple[str, str]], *, workers: int = 1, progress=None,
               stop: Callable[[], bool] | None = None, on_trial=None, on_start=None, log=print) -> list[UnitResult]:
    """Phase 1 with fusion: ``workers`` processes (one per GPU), each with one fused group per method taking
    trials from the studies of ``todo`` (continuous batching: a freed slot takes the next trial)."""
    here = workers <= 1 and visible_gpus() <= 1  # in this process: the stop check, progress and log can be shared
    units = [(f"worker{w}", (cfg, todo, w, stop if here else None, on_trial if here else None,
                             log if here else print)) for w in range(max(1, workers))]
    return run_units(units, _tune_worker, max(1, workers), progress=None, stop=stop, on_start=on_start)
