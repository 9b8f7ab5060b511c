"""Fused multi-run training: a group of N runs of one model trained as one model (horizontal fusion).

Why: a SmolLM2-135M training step is ~3,800 small kernels; at the protocol's batch sizes (1-4) one run is bound by
kernel launches, not by the GPU, and more CUDA streams stop helping near 300 run-steps/s (benchmarks/results/). Fused,
N runs launch about the kernels of one run for N times the work (HFTA, Wang et al., MLSys 2021; multi-adapter LoRA
training over a shared base as in ASPEN/mLoRA).

A group is one Hugging Face classifier whose parameter-holding modules are stacked for N runs (fused_step.py: for
LoRA the base frozen and shared, per-run adapters ``A[N, r, in]``, ``B[N, out, r]`` and score heads; for full FT every
weight). The rows of all runs share one batch, run-major (R rows per run; a run of a smaller batch size fills its
extra rows with zero-weight copies of its first row, as the static path fills a short last batch), and each run's
rows meet only its own weights. Per run, exactly as a lone run (training.py) has them: its initial weights (built by
the same seeded code), data order, learning rate, warmup and schedule length, weight decay, LoRA alpha and dropout
generator, gradient clipping at ``max_grad_norm`` on its own norm, loss (the mean over its real rows), evaluation
points, early stopping, best-checkpoint copy and single test evaluation. A run that ends (early stopping, its last
step, divergence) leaves its slot; the others do not notice (its rows get weight 0 and learning rate 0), and the slot
takes the next run of the source (continuous batching of tuning trials).

What differs from a lone run: LoRA dropout masks come from the run's own generator (seeded with its seed) but are
drawn once per step for all of its dropout modules, at the group's padded width, instead of once per module: the
same distribution, other values (so runs with dropout > 0 match a lone run in distribution, not number for number).
Everything else is the same computation up to floating-point summation order (CPU tests: 1e-5).

A run's slot state (weights, best copy, AdamW moments, dropout generator, schedule, loss window, RunState) is
checkpointed at step boundaries (periodically, on SIGTERM/SIGINT, at the time budget) when its job names a
checkpoint directory, and a job whose checkpoint matches continues from it (checkpoint.py; exact on CPU when the
group holds the same runs).

On CUDA the step and the evaluation forward are captured as CUDA graphs (fast_step's ``_Replayable``); on CPU the
same static code runs without capture. Evaluation of the runs due at a step runs only their slots (their weights
gathered), so runs whose evaluation points differ do not pay for each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from lorastudy import checkpoint as CK
from lorastudy import data as D
from lorastudy.fused_step import (  # noqa: F401 - re-exported: the fused API lives here
    FUSED_LEVERS,
    INHERENT_LEVERS,
    FusedModel,
    FusedStepper,
    FusionError,
    plan_modules,
    trainable_state,
    unfusable_reason,
)
from lorastudy.step_levers import StepLevers
from lorastudy.training import (
    HParams,
    RunData,
    RunState,
    TrainingError,
    amp_dtype,
    peak_memory,
    prepare_data,
    run_buckets,
    seeded_model,
)


# -- runs and where they come from -------------------------------------------------------------------------------
@dataclass
class RunJob:
    """One run for a fused group: what to train and what to do with the outcome.

    ``on_done(metrics)`` gets the run's metrics (with ``"_model"`` and ``"_tokenizer"``, a lone model holding the
    trained weights, when ``keep_model``); ``on_fail(error)`` the exception that ended it (TrainingError when it
    diverged). ``on_eval(step, val)`` is called at each evaluation (it may raise: the run then fails).
    ``checkpoint``: the run's checkpoint directory (checkpoint.py; None: no checkpoints): resumed from when it holds
    one of this run, written when the group checkpoints, removed after ``on_done``; ``on_pause(path)`` is called
    when the group stops the run at the time budget with its checkpoint written."""

    name: str
    task: str
    method: str
    seed: int
    hp: HParams
    train_subset: int | None = None
    evaluate_test: bool = True
    keep_model: bool = False
    on_eval: Callable[[int, dict], None] | None = None
    on_done: Callable[[dict], None] = lambda m: None
    on_fail: Callable[[BaseException], None] = lambda e: None
    checkpoint: Path | None = None
    on_pause: Callable[[Path], None] = lambda p: None


class ListSource:
    """A fixed list of jobs (phase 2); ``stop()`` (a time budget) ends it early: jobs not started stay for a later
    invocation."""

    def __init__(self, jobs: list[RunJob], stop: Callable[[], bool] | None = None) -> None:
        self.jobs, self.stop = list(jobs), stop

    def next(self) -> RunJob | None:
        if not self.jobs or (self.stop is not None and self.stop()):
            return None
        return self.jobs.pop(0)


@dataclass
class _SlotRun:
    job: RunJob
    state: RunState
    sched: Any  # the run's LambdaLR (linear warmup/decay), on a stand-in optimizer
    t_start: float
    t_train: float
    trainable: int
    total: int
    n_window: int = 0  # optimizer steps since the run's last evaluation
    train_loss: float = 0.0  # the mean training loss of the last evaluation window
    ident: dict | None = None  # checkpoint identity (checkpoint.identity) when the job checkpoints
    prior_train_s: float = 0.0  # training time of the earlier sessions of a resumed run


def padded_matrix(seqs: list[list[int]], pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Token rows as one [rows, longest] matrix filled with ``pad_id``, aligned to ``side``; and their lengths."""
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    mat = np.full((len(seqs), max(int(lens.max(initial=0)), 1)), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        if side == "right":
            mat[i, : len(s)] = s
        else:
            mat[i, mat.shape[1] - len(s):] = s
    return mat, lens


def collate_rows(mat: np.ndarray, lens: np.ndarray, idx: np.ndarray, width: int, pad_id: int, side: str
                 ) -> dict[str, np.ndarray]:
    """``data.collate`` of rows ``idx`` padded to ``width``, vectorised over a ``padded_matrix`` (the group builds
    one batch per run per step): input ids, attention mask, and position ids from the mask."""
    w = min(width, mat.shape[1])
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    cols = np.arange(width)[None, :]
    if side == "right":
        ids[:, :w] = mat[idx, :w]
        mask = (cols < lens[idx][:, None]).astype(np.int64)
    else:
        ids[:, width - w:] = mat[idx, mat.shape[1] - w:]
        mask = (cols >= width - lens[idx][:, None]).astype(np.int64)
    pos = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def _chunks(items: list, n: int) -> list[list]:
    return [items[i: i + n] for i in range(0, len(items), n)]


class FusedGroup:
    """N slots training runs of one model and method together; ``run(source)`` trains until the source is empty
    and every slot has finished. Each run's outcome goes to its job's callbacks."""

    def __init__(self, cfg, method: str, num_labels: int, slots: int, rows: int, *, device: torch.device,
                 dropout: bool = True, log: Callable[[str], None] | None = None) -> None:
        from lorastudy.training import step_mode

        if slots < 1 or rows < 1:
            raise FusionError(f"a fused group needs >= 1 slot and row, got {slots} x {rows}")
        self.cfg, self.method, self.num_labels, self.rows, self.device = cfg, method, num_labels, rows, device
        self.log = log or (lambda s: None)
        self.amp = amp_dtype(cfg.train.precision, device)
        self.mode = "cuda_graph" if step_mode(cfg.train.fast_step, device) == "cuda_graph" else "static"
        self.buckets = run_buckets(cfg, self.mode)
        self.fm = FusedModel(cfg, method, num_labels, slots, device, self.amp, cfg.train.fuse_optimizer)
        dropout = dropout and method == "lora"
        # train.step_levers: those that act on a fused step (fused_step.FUSED_LEVERS; the others are noted once)
        levers = StepLevers.from_config(cfg.train, cfg.out)
        skipped = sorted(levers.names - FUSED_LEVERS - INHERENT_LEVERS)
        if skipped:
            self.log(f"fused: step levers {skipped} act on lone runs only; this group runs without them")
        self.stepper = FusedStepper(self.fm, rows, cfg.train.max_grad_norm, cfg.train.eval_batch_size,
                                    cuda_graph=self.mode == "cuda_graph", dropout=dropout, levers=levers)
        self.runs: list[_SlotRun | None] = [None] * slots
        self._data: dict[tuple, RunData] = {}
        self._init: dict[tuple, tuple[dict, int, int]] = {}
        self._padded_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- setting up a run in a slot -------------------------------------------------------------------------------
    def _run_data(self, job: RunJob) -> RunData:
        key = (job.task, job.train_subset, job.evaluate_test)
        if key not in self._data:
            self._data[key] = prepare_data(self.cfg, job.task, self.fm.tokenizer, train_subset=job.train_subset,
                                           evaluate_test=job.evaluate_test, buckets=self.buckets)
        return self._data[key]

    def _initial_weights(self, job: RunJob) -> tuple[dict, int, int]:
        """The run's initial trainable weights, built by the lone run's own seeded code on the CPU. Cached by seed:
        what else differs between runs (lr, schedule, LoRA alpha and dropout) does not enter PEFT's
        initialisation."""
        key = (job.seed, job.task)
        if key not in self._init:
            s = seeded_model(self.cfg, job.task, self.method, job.seed, job.hp, torch.device("cpu"))
            self._init[key] = (trainable_state(s.model), s.trainable, s.total)
            del s
        return self._init[key]

    def _assign(self, slot: int, job: RunJob) -> None:
        if job.method != self.method:
            raise FusionError(f"{job.name}: method {job.method} in a {self.method} group")
        if job.hp.batch_size > self.rows:
            raise FusionError(f"{job.name}: batch size {job.hp.batch_size} > the group's {self.rows} rows per run")
        if self.cfg.task(job.task).num_labels != self.num_labels:
            raise FusionError(f"{job.name}: {self.cfg.task(job.task).num_labels} labels in a group of "
                              f"{self.num_labels}")
        t0 = time.perf_counter()
        data = self._run_data(job)
        state = RunState(self.cfg, job.task, job.method, job.seed, job.hp, data, job.on_eval)
        init, trainable, total = self._initial_weights(job)
        self.fm.load_slot(slot, init)
        hp = job.hp
        self.stepper.assign(slot, job.seed, hp.lora_dropout if job.method == "lora" else 0.0,
                            hp.lora_alpha / self.cfg.lora.rank)
        # the lone run's schedule object (LambdaLR over linear warmup/decay), on a stand-in optimizer
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=hp.lr)
        sched = get_linear_schedule_with_warmup(stand_in, state.warmup_steps, state.total_steps)
        stand_in.step()  # (no gradient: changes nothing) so that the scheduler does not warn about the call order
        run = _SlotRun(job, state, sched, t0, time.perf_counter(), trainable, total)
        if job.checkpoint is not None:
            run.ident = CK.identity(self.cfg, job.task, job.method, job.seed, hp, path=self.stepper.mode,
                                    train_subset=job.train_subset, evaluate_test=job.evaluate_test,
                                    layout=self.fm.bank.layout)
            ck = CK.load(job.checkpoint, run.ident)
            if ck is not None:
                self._restore(slot, run, ck)
        self.runs[slot] = run

    # -- checkpoints of the runs in the slots (checkpoint.py stores them) ----------------------------------------
    def _restore(self, slot: int, run: _SlotRun, ck: dict) -> None:
        """Continue ``run`` in ``slot`` from its checkpoint: weights, best copy, AdamW moments, dropout generator,
        loss window, schedule, RunState (data order, counts, early stopping, curve)."""
        self.fm.bank.load(slot, ck["weights"])
        self.fm.bank.load(slot, ck["best"], buf="best")
        self.stepper.load_slot_state(slot, ck["stepper"])
        run.sched.load_state_dict(ck["sched"])
        run.state.load_state_dict(ck["run"])
        run.n_window, run.train_loss, run.prior_train_s = ck["n_window"], ck["train_loss"], ck["train_time_s"]
        self.log(f"fused: {run.state.name}: resuming from checkpoint {run.job.checkpoint} at step "
                 f"{run.state.step} of {run.state.total_steps}")

    def checkpoint(self) -> list[int]:
        """Write the checkpoint of every run in a slot whose job has one; returns those slots."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        done = []
        for i, run in enumerate(self.runs):
            if run is None or run.job.checkpoint is None:
                continue
            CK.save(run.job.checkpoint, run.ident, {
                "weights": self.fm.bank.read(i), "best": self.fm.bank.read(i, "best"),
                "stepper": self.stepper.slot_state(i), "sched": run.sched.state_dict(),
                "run": run.state.state_dict(), "n_window": run.n_window, "train_loss": run.train_loss,
                "train_time_s": run.prior_train_s + time.perf_counter() - run.t_train})
            done.append(i)
        return done

    def _fill(self, source) -> None:
        for slot, run in enumerate(self.runs):
            if run is not None:
                continue
            while True:
                job = source.next()
                if job is None:
                    return
                try:
                    self._assign(slot, job)
                    break
                except (TrainingError, FusionError) as e:
                    job.on_fail(e)

    # -- one step ------------------------------------------------------------------------------------------------
    def _padded(self, data: RunData) -> tuple[np.ndarray, np.ndarray]:
        if id(data) not in self._padded_cache:
            self._padded_cache[id(data)] = padded_matrix(data.train.input_ids, data.pad_id, data.padding_side)
        return self._padded_cache[id(data)]

    def _step(self) -> None:
        """One fused optimizer step: each run's next batch (its own order), padded to the widest bucket among them,
        filler rows up to R, an empty slot's rows a copy of a real row (with weight 0 beyond the first, lr 0)."""
        n, r = len(self.runs), self.rows
        picks, width = [], 0
        for run in self.runs:
            if run is None:
                picks.append(None)
                continue
            idx = run.state.next_batch()
            picks.append(idx)
            longest = int(run.state.lengths[idx].max())
            width = max(width, D.bucket_width(longest, self.buckets) or longest)
        ids = np.zeros((n, r, width), dtype=np.int64)
        mask = np.zeros((n, r, width), dtype=np.int64)
        pos = np.zeros((n, r, width), dtype=np.int64)
        labels = np.zeros((n, r), dtype=np.int64)
        weights = np.zeros((n, r), dtype=np.float32)
        lrs, decays = [0.0] * n, [1.0] * n
        for i, (run, idx) in enumerate(zip(self.runs, picks, strict=True)):
            if run is None:
                continue
            data = run.state.data
            rows = np.concatenate([idx, np.repeat(idx[:1], r - len(idx))])  # filler rows: copies of the first
            b = collate_rows(*self._padded(data), rows, width, data.pad_id, data.padding_side)
            ids[i], mask[i], pos[i] = b["input_ids"], b["attention_mask"], b["position_ids"]
            labels[i] = data.train.labels[rows]
            weights[i, : len(idx)] = 1.0
            lrs[i] = float(run.sched.get_last_lr()[0])
            decays[i] = 1.0 - lrs[i] * run.job.hp.weight_decay
        first = next(i for i, p in enumerate(picks) if p is not None)
        for i, idx in enumerate(picks):
            if idx is None:  # an empty slot computes a copy of a real row, with learning rate 0
                ids[i], mask[i], pos[i], labels[i], weights[i, 0] = ids[first], mask[first], pos[first], \
                    labels[first], 1.0
        host = torch.from_numpy(np.stack([ids, mask, pos]).reshape(3, n * r, width))
        self.stepper.step(host, torch.from_numpy(labels.reshape(-1)), torch.from_numpy(weights), lrs, decays)
        for run in self.runs:
            if run is not None:
                run.sched.step()
                run.n_window += 1

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _predict(self, slots: list[int], enc: D.Encoded, data: RunData) -> dict[int, np.ndarray]:
        """Logits of ``slots`` (all evaluating ``enc``) in row order, like training.predict for each alone."""
        out = {s: np.empty((len(enc), self.num_labels), dtype=np.float32) for s in slots}
        lengths = enc.lengths()
        for chunk in _chunks(slots, self.fm.n):
            parts, order = [], []
            for idx in D.sequential_batches(lengths, self.cfg.train.eval_batch_size):
                parts.append(self.stepper.logits(data.collate(enc, idx), chunk).clone())
                order.append(idx)
            if parts:
                logits = torch.cat(parts, dim=1).float().cpu().numpy()
                rows = np.concatenate(order)
                for j, s in enumerate(chunk):
                    out[s][rows] = logits[j]
        return out

    def _fail(self, slot: int, err: BaseException) -> None:
        run = self.runs[slot]
        self.runs[slot] = None  # its rows get weight 0 and learning rate 0 from the next step on
        self.log(f"fused: {run.state.name} failed: {err}")
        run.job.on_fail(err)

    def _evaluate_due(self) -> None:
        due = [i for i, run in enumerate(self.runs) if run is not None and run.state.eval_due]
        if not due:
            return
        sums = self.stepper.take_loss(due)
        ok = []
        for i, s in zip(due, sums, strict=True):
            run = self.runs[i]
            try:
                run.train_loss = run.state.train_loss(torch.tensor(s), run.n_window)
                run.n_window = 0
                ok.append(i)
            except TrainingError as e:
                self._fail(i, e)
        for slots in self._by_data(ok).values():
            data = self.runs[slots[0]].state.data
            preds = self._predict(slots, data.validation, data)
            for i in slots:
                run = self.runs[i]
                try:
                    val = run.state.score(preds[i], data.validation.labels)
                    if run.state.record_eval(run.train_loss, val, float(run.sched.get_last_lr()[0])):
                        self.fm.bank.keep_best(i)
                except Exception as e:  # noqa: BLE001 - diverged, or on_eval raised: this run fails alone
                    self._fail(i, e)
        finished = [i for i in ok if self.runs[i] is not None and self.runs[i].state.done]
        if finished:
            self._finish(finished)

    def _by_data(self, slots: list[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i in slots:
            groups.setdefault(id(self.runs[i].state.data), []).append(i)
        return groups

    def _finish(self, slots: list[int]) -> None:
        """Restore each run's best weights, evaluate its test split once, hand over its metrics and free the slot."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        for i in slots:
            self.fm.bank.restore_best(i)
        tests: dict[int, dict] = {}
        with_test = [i for i in slots if self.runs[i].state.data.test is not None]
        for group in self._by_data(with_test).values():
            data = self.runs[group[0]].state.data
            preds = self._predict(group, data.test, data)
            for i in group:
                tests[i] = self.runs[i].state.test_metrics(preds[i])
        for i in slots:
            run = self.runs[i]
            self.runs[i] = None
            try:
                m = run.state.metrics(train_time=now - run.t_train + run.prior_train_s,
                                      peak_memory_bytes=peak_memory(self.device),
                                      device=self.device, amp=self.amp, mode=self.stepper.mode,
                                      trainable=run.trainable, total=run.total)
                m.update(tests.get(i, {}))
                m["step_levers"] = list(self.stepper.lever_names)
                m["fused_optimizer"] = self.fm.optimizer  # the group's optimizer pass (train.fuse_optimizer)
                m["wall_time_s"] = time.perf_counter() - run.t_start
                if run.job.keep_model:
                    m["_model"], m["_tokenizer"] = self.lone_model(run, i)
            except Exception as e:  # noqa: BLE001
                run.job.on_fail(e)
                continue
            try:
                run.job.on_done(m)
            except Exception as e:  # noqa: BLE001 - e.g. a full disk while saving: this run fails, not the group
                self.log(f"fused: {run.state.name}: {type(e).__name__}: {e}")
                run.job.on_fail(e)
                continue
            CK.remove(run.job.checkpoint)  # saved: the checkpoint has served

    def lone_model(self, run: _SlotRun, slot: int):
        """A lone run's model (CPU) holding the slot's weights: what ``train_run(keep_model=True)`` returns."""
        job = run.job
        s = seeded_model(self.cfg, job.task, job.method, job.seed, job.hp, torch.device("cpu"))
        state = self.fm.lone_state(slot)
        with torch.no_grad():
            params = dict(s.model.named_parameters())
            for name, t in state.items():
                params[name].copy_(t)
        return s.model, s.tokenizer

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self, source, stop: Callable[[], bool] | None = None) -> None:
        """Train until ``source.next()`` gives nothing more and every slot is done. A run that fails (diverged,
        on_eval raised) fails alone; an error of the group (out of memory, a bug) fails every run in it and is
        raised; an interrupt (KeyboardInterrupt) leaves the runs unreported, as a killed lone run would.

        Checkpoints (runs whose job has a ``checkpoint``), at step boundaries: every
        ``train.checkpoint_every_min`` minutes; on SIGTERM/SIGINT (execution.interrupt_requested; then
        KeyboardInterrupt); when ``stop()`` (the time budget) says so, after which the runs are paused
        (``on_pause``) and ``run`` returns."""
        from lorastudy.execution import interrupt_requested

        policy = CK.Policy(self.cfg.train.checkpoint_every_min, stop)
        try:
            while True:
                if interrupt_requested():
                    raise KeyboardInterrupt("fused group: interrupted")
                self._fill(source)
                if not any(r is not None for r in self.runs):
                    return
                try:
                    self._step()
                except torch.cuda.OutOfMemoryError as e:
                    raise TrainingError(f"fused group of {self.fm.n} x {self.rows} rows: GPU out of memory ({e}); "
                                        "lower train.fuse_max_runs") from None
                self._evaluate_due()
                why = policy.due() if any(r is not None for r in self.runs) else None
                if why is not None:
                    saved = self.checkpoint()
                    policy.written()
                    if why == "interrupt":
                        raise KeyboardInterrupt(f"fused group: {len(saved)} checkpoint(s) written")
                    if why == "stop":
                        for i, run in enumerate(self.runs):
                            if run is not None:
                                self.runs[i] = None
                                if i in saved:
                                    run.job.on_pause(run.job.checkpoint)
                                else:  # nothing to resume from: it fails (a rerun starts it again)
                                    run.job.on_fail(TrainingError(f"{run.state.name}: stopped by the time budget"))
                        return
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            for i, run in enumerate(self.runs):
                if run is not None:
                    self.runs[i] = None
                    run.job.on_fail(e)
            raise
        finally:
            self.stepper.close()


def train_group(cfg, jobs: list[RunJob], *, slots: int | None = None, rows: int | None = None,
                device: torch.device | None = None, log=None) -> None:
    """Train ``jobs`` (one method, one label count) in one fused group of ``slots`` (default: one per job) x
    ``rows`` (default: the largest batch size). Outcomes go to each job's callbacks."""
    from lorastudy.execution import resolve_device

    if not jobs:
        return
    device = device or resolve_device(cfg.train.device)
    method = jobs[0].method
    group = FusedGroup(cfg, method, cfg.task(jobs[0].task).num_labels, slots or len(jobs),
                       rows or max(j.hp.batch_size for j in jobs), device=device,
                       dropout=any(j.hp.lora_dropout > 0 for j in jobs), log=log)
    group.run(ListSource(jobs))


def train_runs(cfg, specs: list[dict], **kw) -> list[dict | BaseException]:
    """Fused counterpart of calling ``training.train_run`` for each spec (keys: task, method, seed, hp and
    optionally train_subset, evaluate_test, keep_model): the metrics, or the exception that ended the run."""
    out: list[Any] = [None] * len(specs)
    jobs = []
    for i, sp in enumerate(specs):
        def done(m, i=i):
            out[i] = m

        def fail(e, i=i):
            out[i] = e

        jobs.append(RunJob(f"{sp['task']}/{sp['method']}/seed{sp['seed']}#{i}", sp["task"], sp["method"],
                           sp["seed"], sp["hp"], sp.get("train_subset"), sp.get("evaluate_test", True),
                           sp.get("keep_model", False), sp.get("on_eval"), done, fail))
    train_group(cfg, jobs, **kw)
    return out
