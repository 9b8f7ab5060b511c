"""One fine-tuning run: (task, method, seed, hyperparameters) -> trained model + metrics.

``train_run`` reads top to bottom as setup -> fit -> validate (litgpt's split):

* setup: the run's model (seeded, under the init lock), its data (``RunData``), its state (``RunState``: data order,
  step, early stopping, curve) and a stepper (eager, static or CUDA-graph; see ``Stepper``);
* fit: the loop over length-grouped batches, validation ``evals_per_epoch`` times per epoch, early stopping on
  validation loss (``EarlyStopping``);
* validate: restore the best weights, evaluate the test split once, build the metrics.

The per-run objects (``RunState``, ``DataOrder``, ``EarlyStopping``) are explicit and shared with fused groups
(fused.py), where one loop advances many runs at once; their state is plain data, for checkpoints: a run given a
checkpoint directory (``run_and_save``: ``<run dir>.ckpt``) writes one at step boundaries (``LoneCheckpoint``) and
continues from a matching one (checkpoint.py).

No host sync inside the step: the running loss stays on the device and is read at evaluation points only; a NaN/inf
anywhere in the window makes that sum non-finite, so divergence is still caught. On CUDA the step and the evaluation
forward are replayed as CUDA graphs over static padded shapes (``train.fast_step``, see fast_step.py);
``train_step`` below is the eager reference path. Where a run executes (device, threads, fused groups) is decided
by execution.py and passed in as a context.
"""

from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from lorastudy import checkpoint as CK
from lorastudy import data as D
from lorastudy import metrics as MT
from lorastudy import modeling as M
from lorastudy import store
from lorastudy.fast_step import StaticForward, StaticTrainStep, default_buckets, fuse_rms_norms
from lorastudy.step_levers import StepLevers


class TrainingError(RuntimeError):
    """A run that cannot finish (diverged, out of memory)."""


@dataclass
class HParams:
    lr: float
    batch_size: int
    epochs: float
    warmup_ratio: float
    weight_decay: float
    lora_alpha: float
    lora_dropout: float
    max_steps: int | None = None

    @classmethod
    def from_config(cls, cfg, method: str, overrides: dict[str, Any] | None = None) -> HParams:
        from lorastudy.config import ConfigError, validate_hparams

        t = cfg.train
        if method not in t.lr:
            raise ConfigError(f"train.lr has no entry for method {method!r}")
        hp = cls(t.lr[method], t.batch_size, t.epochs, t.warmup_ratio, t.weight_decay, cfg.lora.alpha,
                 cfg.lora.dropout, t.max_steps)
        # validated, not cast: epochs=2.5 stays 2.5, batch_size=2.5 and lr=-1 are refused naming hp.NAME
        return cls(**validate_hparams({**asdict(hp), **(overrides or {})}))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(spec: str, ctx=None) -> torch.device:
    """``train.device`` resolved where the work runs (``execution.resolve_device``; ``ctx``: an
    ``execution.Context`` naming the GPU a worker was given)."""
    from lorastudy.execution import resolve_device

    return resolve_device(spec, ctx)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# -- evaluation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, enc: D.Encoded, pad_id: int, padding_side: str, batch_size: int, device: torch.device,
            amp: torch.dtype | None, buckets: list[int] | None = None,
            runner: StaticForward | None = None) -> np.ndarray:
    """Logits (float32, original row order) for an encoded split; batches sorted by length for little padding.
    ``runner`` = the static-shape (CUDA-graph) forward of the fast path; its batch size wins."""
    was_training = model.training
    model.eval()
    batch_size = runner.batch_size if runner is not None else batch_size
    lengths = enc.lengths()
    parts, order = [], []
    for idx in D.sequential_batches(lengths, batch_size):
        pad_to = D.bucket_width(int(lengths[idx].max()), buckets)
        cpu = D.collate([enc.input_ids[i] for i in idx], pad_id, padding_side, pad_to)
        if runner is not None:
            logits = runner.logits(cpu).clone()  # the runner's output buffer is reused by the next batch
        else:
            batch = {k: v.to(device, non_blocking=True) for k, v in cpu.items()}
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = M.classifier_logits(model, batch).float()
        parts.append(logits)  # stays on the device: one copy to the host at the end, not one sync per batch
        order.append(idx)
    model.train(was_training)
    out = np.empty((len(enc), model.config.num_labels), dtype=np.float32)
    if parts:
        out[np.concatenate(order)] = torch.cat(parts).float().cpu().numpy()
    return out


def scores(logits: np.ndarray, labels: np.ndarray, metrics=("accuracy",)) -> dict[str, float]:
    """Mean cross-entropy ``loss`` of logits [n, K] against labels [n], and each named metric of the argmax
    predictions (lorastudy.metrics: the task's declared ``TaskSpec.metrics``)."""
    preds = logits.argmax(-1)
    loss = float(F.cross_entropy(torch.as_tensor(logits), torch.tensor(labels)).item())
    return {"loss": loss, **MT.compute(list(metrics), labels, preds)}


def majority_accuracy(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Accuracy of always predicting the training split's majority class on the test split."""
    maj = np.bincount(train_labels).argmax()
    return float((test_labels == maj).mean())


# -- setup -------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    model: Any
    tokenizer: Any
    device: torch.device
    amp: torch.dtype | None
    trainable: int
    total: int
    params: list = field(default_factory=list)


def build_model(cfg, task: str, method: str, seed: int, hp: HParams, device: torch.device) -> Setup:
    spec = cfg.task(task)
    model, tok = M.load_base(cfg.model, spec.num_labels, seed=seed)
    if method == "lora":
        model = M.wrap_lora(model, cfg.lora.rank, hp.lora_alpha, hp.lora_dropout, cfg.lora.target_modules)
    elif method != "full":
        raise ValueError(f"unknown method {method!r}")
    model.to(device)
    model.train()
    trainable, total = M.trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return Setup(model, tok, device, amp_dtype(cfg.train.precision, device), trainable, total, params)


def seeded_model(cfg, task: str, method: str, seed: int, hp: HParams, device: torch.device) -> Setup:
    """``build_model`` with the run's seed, and the run's own dropout generator (modeling.SeededDropout), under the
    process's init lock: with several runs per process a run's initial weights come from its own seed whatever the
    other threads draw meanwhile."""
    from lorastudy.execution import INIT_LOCK

    with INIT_LOCK:
        seed_everything(seed)
        s = build_model(cfg, task, method, seed, hp, device)
        M.seed_dropout(s.model, seed, device)
    return s


def make_optimizer(model, hp: HParams, device: torch.device, graphs: bool = False) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D tensors), as in HF Trainer. ``graphs``: capturable,
    with the learning rate as a device tensor per group (the scheduler writes it in place; a graph reads it)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if graphs:
        for g in groups:
            g["lr"] = torch.tensor(hp.lr, dtype=torch.float32, device=device)
        kw["capturable"] = True
    return torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.999), eps=1e-8, **kw)


def step_mode(spec: str, device: torch.device) -> str:
    """Resolve ``train.fast_step``: auto = cuda_graph on CUDA, the eager reference path elsewhere."""
    if spec == "auto":
        return "cuda_graph" if device.type == "cuda" else "eager"
    if spec == "cuda_graph" and device.type != "cuda":
        raise TrainingError(f"train.fast_step=cuda_graph needs a CUDA device, not {device}; use static or eager")
    return spec


def run_buckets(cfg, mode: str) -> list[int] | None:
    """Padded widths: ``train.shape_buckets``, else a default set on the static paths (every batch must land in a
    bucket there: a graph per stray width would pile up), else dynamic padding (None)."""
    L = cfg.data.max_length
    buckets = cfg.train.shape_buckets or (default_buckets(L) if mode != "eager" else None)
    if mode != "eager":
        buckets = sorted(set(buckets) | {L})
    return buckets


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(s: Setup, opt, sched, batch: dict, labels: torch.Tensor, max_norm: float) -> torch.Tensor:
    """One optimizer step; returns the loss as a device tensor (no host sync)."""
    with torch.autocast(s.device.type, dtype=s.amp, enabled=s.amp is not None):
        logits = M.classifier_logits(s.model, batch)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.params, max_norm, foreach=True)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def device_name(device: torch.device) -> str:
    """The accelerator's product name (e.g. ``NVIDIA H200``) for CUDA devices, else the device type."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: max RSS of the process


# -- a run's data and state (shared with fused groups) -----------------------------------------------------------
@dataclass
class RunData:
    """The encoded splits of one run (test only when it will be evaluated) and how batches are padded."""

    task: str
    train: D.Encoded
    validation: D.Encoded
    test: D.Encoded | None
    test_idx: list | None
    pad_id: int
    padding_side: str
    buckets: list[int] | None
    inputs: dict  # text normalisation and the resolved pair template (data.input_format), recorded per run

    def collate(self, enc: D.Encoded, idx: np.ndarray, pad_to: int | None = None) -> dict:
        """A CPU batch of rows ``idx`` of ``enc``, padded to its bucket width (or ``pad_to``)."""
        if pad_to is None:
            pad_to = D.bucket_width(int(max(len(enc.input_ids[i]) for i in idx)), self.buckets)
        return D.collate([enc.input_ids[i] for i in idx], self.pad_id, self.padding_side, pad_to)


def prepare_data(cfg, task: str, tokenizer, *, splits: D.Splits | None = None, train_subset: int | None = None,
                 evaluate_test: bool = True, buckets: list[int] | None = None) -> RunData:
    """Encode the run's splits (``train_subset``: a seeded stratified subset of train, for HPO).

    Raises TrainingError when train or validation is empty."""
    spec = cfg.task(task)
    splits = splits or D.splits_for(cfg, task)
    train_df = D.subset(splits.train, train_subset, cfg.data.split_seed, f"{task}-hpo") if train_subset \
        else splits.train
    enc_train = D.encode(tokenizer, train_df, spec, cfg.data)
    enc_val = D.encode(tokenizer, splits.validation, spec, cfg.data)
    if len(enc_train) == 0 or len(enc_val) == 0:
        raise TrainingError(f"{task}: empty train or validation split")
    enc_test = D.encode(tokenizer, splits.test, spec, cfg.data) if evaluate_test else None
    return RunData(task, enc_train, enc_val, enc_test, splits.test["idx"].tolist() if evaluate_test else None,
                   tokenizer.pad_token_id, cfg.model.padding_side, buckets,
                   D.input_format(tokenizer, cfg.data, spec))


class DataOrder:
    """A run's training batches: per epoch, length-grouped (``group_by_length``) or plainly shuffled, from the
    run's own generator seeded with its seed. The position (epoch, batch within it, the generator state at the
    epoch's start) is explicit, so a checkpoint can restore it."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool) -> None:
        self.lengths, self.batch_size, self.group_by_length = lengths, batch_size, group_by_length
        self.rng = np.random.default_rng(seed)
        self.epoch, self.pos = -1, 0
        self.batches: list[np.ndarray] = []
        self.epoch_rng_state: dict | None = None

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.epoch_rng_state = self.rng.bit_generator.state
        if self.group_by_length:
            self.batches = D.length_grouped_order(self.lengths, self.batch_size, self.rng)
        else:
            n_batches = math.ceil(len(self.lengths) / self.batch_size)
            self.batches = list(np.array_split(self.rng.permutation(len(self.lengths)), n_batches))
        self.pos = 0

    def next(self) -> np.ndarray:
        """The next batch (row indices); a new epoch's order is drawn when the last one is used up."""
        if self.pos >= len(self.batches):
            self._new_epoch()
        idx = self.batches[self.pos]
        self.pos += 1
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "epoch_rng_state": self.epoch_rng_state,
                "rng_state": self.rng.bit_generator.state}

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.batches = st["epoch"], []
        if st["epoch_rng_state"] is not None:
            self.epoch -= 1
            self.rng.bit_generator.state = st["epoch_rng_state"]
            self._new_epoch()  # redraws the same epoch order
        self.pos = st["pos"]
        self.rng.bit_generator.state = st["rng_state"]


class EarlyStopping:
    """Patience on validation loss: a run stops after ``patience`` evaluations in a row without a new best."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss, self.best_step, self.best_val, self.bad = math.inf, 0, None, 0

    def update(self, step: int, val: dict) -> bool:
        """Record an evaluation; True when it is the new best (its weights should be kept)."""
        if val["loss"] < self.best_loss:
            self.best_loss, self.best_step, self.best_val, self.bad = val["loss"], step, val, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "best_val": self.best_val, "bad": self.bad}

    def load_state_dict(self, st: dict) -> None:
        self.best_loss, self.best_step, self.best_val, self.bad = (st["best_loss"], st["best_step"], st["best_val"],
                                                                   st["bad"])


class RunState:
    """One run's progress through fit: its plan (steps, evaluation points), data order, step and token counts,
    early stopping and curve. ``on_eval(step, val_metrics)`` is called at each evaluation (it may raise to prune)."""

    def __init__(self, cfg, task: str, method: str, seed: int, hp: HParams, data: RunData, on_eval=None) -> None:
        self.task, self.method, self.seed, self.hp, self.data, self.on_eval = task, method, seed, hp, data, on_eval
        self.spec = cfg.task(task)
        from lorastudy.execution import planned_steps

        self.steps_per_epoch = math.ceil(len(data.train) / hp.batch_size)
        self.total_steps = planned_steps(len(data.train), hp)
        self.warmup_steps = int(round(hp.warmup_ratio * self.total_steps))
        self.eval_every = max(1, self.steps_per_epoch // cfg.train.evals_per_epoch)
        self.lengths = data.train.lengths()
        self.labels = torch.tensor(data.train.labels)
        self.order = DataOrder(self.lengths, hp.batch_size, seed, cfg.train.group_by_length)
        self.stopper = EarlyStopping(cfg.train.patience)
        self.step = self.tokens = 0
        self.curve: list[dict] = []
        self.stopped_early = False

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}/seed{self.seed}"

    def next_batch(self) -> np.ndarray:
        """Row indices of the next training batch; counts the step and its tokens."""
        idx = self.order.next()
        self.step += 1
        self.tokens += int(self.lengths[idx].sum())
        return idx

    @property
    def eval_due(self) -> bool:
        return self.step % self.eval_every == 0 or self.step == self.total_steps

    @property
    def done(self) -> bool:
        return self.stopped_early or self.step >= self.total_steps

    def train_loss(self, loss_sum: torch.Tensor, n: int) -> float:
        """Mean training loss of the window (the one host sync per evaluation); TrainingError if non-finite."""
        loss = float(loss_sum.item()) / max(n, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"{self.name}: non-finite training loss before step {self.step} "
                                f"(lr={self.hp.lr}); the run is marked failed")
        return loss

    def record_eval(self, train_loss: float, val: dict, lr: float) -> bool:
        """Append the evaluation to the curve, tell ``on_eval``, update early stopping; True when it is the new
        best (the caller keeps the weights). TrainingError on a non-finite validation loss."""
        if not math.isfinite(val["loss"]):
            raise TrainingError(f"{self.name}: non-finite validation loss at step {self.step}")
        self.curve.append({"step": self.step, "epoch": self.step / self.steps_per_epoch, "train_loss": train_loss,
                           "val_loss": val["loss"], **{f"val_{k}": v for k, v in val.items() if k != "loss"},
                           "lr": lr})
        if self.on_eval is not None:
            self.on_eval(self.step, val)
        improved = self.stopper.update(self.step, val)
        self.stopped_early = self.stopper.should_stop
        return improved

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "curve": list(self.curve),
                "stopped_early": self.stopped_early, "order": self.order.state_dict(),
                "stopper": self.stopper.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        """Continue from ``state_dict()`` of the same run (a checkpoint)."""
        self.step, self.tokens, self.curve = st["step"], st["tokens"], list(st["curve"])
        self.stopped_early = st["stopped_early"]
        self.order.load_state_dict(st["order"])
        self.stopper.load_state_dict(st["stopper"])

    def metrics(self, *, train_time: float, peak_memory_bytes: int, device: torch.device,
                amp: torch.dtype | None, mode: str, trainable: int, total: int) -> dict[str, Any]:
        """The run's metrics.json content (test results are added by ``test_metrics``)."""
        return {
            "task": self.task, "method": self.method, "seed": self.seed, "hparams": asdict(self.hp),
            "best_step": self.stopper.best_step, "steps": self.step, "total_steps_planned": self.total_steps,
            "stopped_early": self.stopped_early,
            "validation": self.stopper.best_val, "curve": self.curve,
            "train_time_s": train_time, "tokens_per_s": self.tokens / max(train_time, 1e-9),
            "train_tokens": self.tokens,
            # process-wide: with several runs per process (--streams, fused groups) it covers all of them
            "peak_memory_bytes": peak_memory_bytes, "peak_memory_scope": "process", "device": str(device),
            "device_name": device_name(device),
            "precision": "bf16-autocast" if amp else "fp32", "step_mode": mode, "step_levers": [],
            "fused_optimizer": None,  # a fused group's optimizer pass (fused.py sets it; lone runs have none)
            "trainable_params": trainable, "total_params": total,
            "n_train": len(self.data.train), "n_validation": len(self.data.validation),
            "inputs": self.data.inputs,
        }

    def score(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Loss and the task's declared metrics (``TaskSpec.metrics``) of logits [n, K] against labels [n]."""
        return scores(logits, labels, self.spec.metrics)

    def test_metrics(self, logits: np.ndarray) -> dict[str, Any]:
        """Test scores, the majority-class baseline, the collapse flag and the predictions."""
        enc, primary = self.data.test, self.spec.primary
        test = self.score(logits, enc.labels)
        maj = majority_accuracy(self.data.train.labels, enc.labels)
        # collapse rule: at or below the majority-class predictor (train's majority class) on the primary metric
        maj_pred = np.full(len(enc), np.bincount(self.data.train.labels).argmax())
        maj_primary = MT.compute([primary], enc.labels, maj_pred)[primary]
        return {
            "test": test, "n_test": len(enc), "majority_accuracy": maj,
            # the known full-FT failure mode on RTE/MRPC: reported, never dropped
            "primary_metric": primary, "majority_baseline": {primary: maj_primary},
            "collapsed": bool(test[primary] <= maj_primary),
            "test_predictions": logits.argmax(-1).tolist(), "test_labels": enc.labels.tolist(),
            "test_idx": self.data.test_idx,
        }


# -- steppers: one optimizer step, the loss window, the evaluation forward ---------------------------------------
class Stepper(Protocol):
    """What fit needs from a training path; the eager, static and fused steps implement it (the fused one with one
    entry per run of its group, see fused.FusedStepper)."""

    mode: str

    def step(self, batch: dict, labels: torch.Tensor) -> None:
        """One optimizer step (and schedule step) on a collated CPU batch."""

    def take_loss(self) -> tuple[torch.Tensor, int]:
        """(sum of step losses on the device, steps) since the last call; resets the window."""

    def lr(self) -> float:
        """The learning rate of the last step (for the curve)."""

    def predict(self, enc: D.Encoded) -> np.ndarray:
        """Logits [rows, labels] for an encoded split, in row order (model in eval mode meanwhile)."""

    def close(self) -> None:
        """Free graphs and buffers (called in ``finally``)."""


class EagerStepper:
    """The eager reference path: HF/PEFT forward under autocast, ``train_step``, predictions with ``predict``."""

    def __init__(self, cfg, s: Setup, opt, sched, data: RunData, mode: str = "eager") -> None:
        self.s, self.opt, self.sched, self.data, self.mode = s, opt, sched, data, mode
        self.max_norm, self.eval_batch_size = cfg.train.max_grad_norm, cfg.train.eval_batch_size
        self.loss, self.n = torch.zeros((), device=s.device), 0
        self.lever_names: list[str] = []  # train.step_levers act on the static path only

    def step(self, batch: dict, labels: torch.Tensor) -> None:
        y = labels.to(self.s.device, non_blocking=True)
        self.loss += train_step(self.s, self.opt, self.sched, to_device(batch, self.s.device), y, self.max_norm)
        self.n += 1

    def take_loss(self) -> tuple[torch.Tensor, int]:
        out, n = self.loss, self.n
        self.loss, self.n = torch.zeros((), device=self.s.device), 0
        return out, n

    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def predict(self, enc: D.Encoded) -> np.ndarray:
        d = self.data
        return predict(self.s.model, enc, d.pad_id, d.padding_side, self.eval_batch_size, self.s.device, self.s.amp,
                       d.buckets)

    def close(self) -> None:
        pass

    def _window(self) -> tuple[torch.Tensor, int]:
        return self.loss, self.n

    def _set_window(self, loss: torch.Tensor, n: int) -> None:
        self.loss, self.n = loss.to(self.s.device), n

    def state_dict(self) -> dict:
        """Optimizer, schedule, the loss window since the last evaluation and the dropout generator (checkpoints)."""
        loss, n = self._window()
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "loss": loss.clone(), "n": n,
                "generators": [g.get_state() for g in M.dropout_generators(self.s.model)]}

    def load_state_dict(self, st: dict) -> None:
        """Continue from ``state_dict()`` (the model's weights are loaded by the caller)."""
        CK.load_optimizer_state(self.opt, st["opt"])
        self.sched.load_state_dict(st["sched"])
        self._set_window(st["loss"], st["n"])
        for g, gs in zip(M.dropout_generators(self.s.model), st["generators"], strict=True):
            g.set_state(gs)


class StaticStepper(EagerStepper):
    """The fast path: static shapes, replayed as CUDA graphs on GPU (``cuda_graph``) or run eagerly (``static``)."""

    def __init__(self, cfg, s: Setup, opt, sched, data: RunData, mode: str, batch_size: int) -> None:
        super().__init__(cfg, s, opt, sched, data, mode)
        graph = mode == "cuda_graph"
        fuse_rms_norms(s.model)  # fewer kernels, same computation (the model is this run's own)
        levers = StepLevers.from_config(cfg.train, cfg.out)  # train.step_levers (step_levers.py)
        self.fast = StaticTrainStep(s.model, s.params, opt, batch_size, cfg.train.max_grad_norm, s.amp, s.device,
                                    cuda_graph=graph, levers=levers)
        self.runner = StaticForward(s.model, cfg.train.eval_batch_size, s.amp, s.device, cuda_graph=graph,
                                    levers=levers)
        self.lever_names = sorted(self.fast.levers.names)

    def step(self, batch: dict, labels: torch.Tensor) -> None:
        self.fast.step(batch, labels)
        self.sched.step()

    def take_loss(self) -> tuple[torch.Tensor, int]:
        return self.fast.take_loss()

    def _window(self) -> tuple[torch.Tensor, int]:
        return self.fast.loss_sum, self.fast.n_steps

    def _set_window(self, loss: torch.Tensor, n: int) -> None:
        self.fast.loss_sum.copy_(loss)  # in place: a captured graph accumulates into it
        self.fast.n_steps = n

    def state_dict(self) -> dict:
        st = super().state_dict()
        if self.fast.step_opt is not self.opt:  # flat_optimizer: the flat twin holds the moments
            st["step_opt"] = self.fast.step_opt.state_dict()
        return st

    def load_state_dict(self, st: dict) -> None:
        super().load_state_dict(st)
        if "step_opt" in st:
            CK.load_optimizer_state(self.fast.step_opt, st["step_opt"])
        if self.fast.compute is not None:
            self.fast.compute.refresh()  # bf16_weights: compute copies of the loaded masters

    def predict(self, enc: D.Encoded) -> np.ndarray:
        d = self.data
        return predict(self.s.model, enc, d.pad_id, d.padding_side, self.eval_batch_size, self.s.device, self.s.amp,
                       d.buckets, self.runner)

    def close(self) -> None:
        self.fast.close()
        self.runner.close()


def make_stepper(cfg, s: Setup, hp: HParams, state: RunState, mode: str) -> EagerStepper:
    """The stepper of ``mode`` (eager | static | cuda_graph) with its AdamW and linear warmup/decay schedule."""
    opt = make_optimizer(s.model, hp, s.device, graphs=mode == "cuda_graph")
    sched = get_linear_schedule_with_warmup(opt, state.warmup_steps, state.total_steps)
    if mode == "eager":
        return EagerStepper(cfg, s, opt, sched, state.data)
    return StaticStepper(cfg, s, opt, sched, state.data, mode, hp.batch_size)


# -- checkpoints of a lone run (checkpoint.py stores them) -------------------------------------------------------
class LoneCheckpoint:
    """Where and when a lone run writes its checkpoint, and what goes in: the trainable weights, the stepper's
    optimizer / schedule / loss window / dropout generator, the RunState (data order with its numpy generator,
    step and token counts, early stopping, curve), the process's torch RNG states, the best-so-far weights and the
    training time so far. ``stop()``: the time budget (the run then pauses with ``checkpoint.RunPaused``)."""

    def __init__(self, cfg, path: Path, ident: dict, stop=None) -> None:
        self.path, self.ident = Path(path), ident
        self.policy = CK.Policy(cfg.train.checkpoint_every_min, stop)
        self.prior_train_s = 0.0  # training time of the earlier sessions of a resumed run
        self.t_train = time.perf_counter()

    def train_time(self) -> float:
        return self.prior_train_s + time.perf_counter() - self.t_train

    def save(self, state: RunState, stepper, model, best: dict | None) -> None:
        device = next(model.parameters()).device
        CK.save(self.path, self.ident, {
            "weights": {n: p for n, p in model.named_parameters() if p.requires_grad}, "best": best,
            "stepper": stepper.state_dict(), "run": state.state_dict(), "rng": CK.rng_state(device),
            "train_time_s": self.train_time()})
        self.policy.written()

    def restore(self, state: RunState, stepper, model) -> tuple[bool, dict | None]:
        """Load the checkpoint when there is a usable one: (resumed, best weights on the model's device)."""
        ck = CK.load(self.path, self.ident)
        if ck is None:
            return False, None
        device = next(model.parameters()).device
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in ck["weights"].items():
                params[n].copy_(t)
        stepper.load_state_dict(ck["stepper"])
        state.load_state_dict(ck["run"])
        CK.set_rng_state(ck["rng"], device)
        self.prior_train_s = ck["train_time_s"]
        CK.log.warning(f"{state.name}: resuming from checkpoint {self.path} at step {state.step} of "
                       f"{state.total_steps}")
        best = None if ck["best"] is None else {n: t.to(device) for n, t in ck["best"].items()}
        return True, best

    def at_boundary(self, state: RunState, stepper, model, best: dict | None) -> None:
        """At a step boundary: write the checkpoint when due; stop after it on an interrupt (KeyboardInterrupt:
        exit 130) or when the time budget is spent (checkpoint.RunPaused)."""
        why = self.policy.due()
        if why is None:
            return
        self.save(state, stepper, model, best)
        if why == "interrupt":
            raise KeyboardInterrupt(f"{state.name}: checkpoint written at step {state.step}")
        if why == "stop":
            raise CK.RunPaused(state.name, self.path, state.step)


# -- the run -----------------------------------------------------------------------------------------------------
def fit(state: RunState, stepper: Stepper, model, best: dict | None = None,
        ckpt: LoneCheckpoint | None = None) -> dict | None:
    """Train until the planned steps or early stopping; returns the best weights (trainable tensors, on the
    device) by validation loss (``best``: those of a resumed run). ``ckpt``: checkpoints at step boundaries
    (periodic, on SIGTERM/SIGINT, at the time budget; see LoneCheckpoint.at_boundary). Raises TrainingError when
    the run diverges, KeyboardInterrupt or checkpoint.RunPaused after writing a checkpoint."""
    from lorastudy.execution import interrupt_requested

    while not state.done:
        idx = state.next_batch()
        stepper.step(state.data.collate(state.data.train, idx), state.labels[torch.as_tensor(idx)])
        if state.eval_due:
            train_loss = state.train_loss(*stepper.take_loss())
            val = state.score(stepper.predict(state.data.validation), state.data.validation.labels)
            if state.record_eval(train_loss, val, stepper.lr()):
                best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if ckpt is not None and not state.done:
            ckpt.at_boundary(state, stepper, model, best)
        elif not state.done and interrupt_requested():  # a run without checkpoints (a trial) stops at once
            raise KeyboardInterrupt(f"{state.name}: interrupted at step {state.step}")
    return best


def validate(state: RunState, stepper: Stepper, model, best: dict | None) -> dict | None:
    """Restore the best checkpoint (by validation loss) and evaluate the test split once (when it was encoded);
    returns the test metrics or None."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if best is not None and n in best:
                p.copy_(best[n])
    if state.data.test is None:
        return None
    return state.test_metrics(stepper.predict(state.data.test))


def train_run(
    cfg,
    task: str,
    method: str,
    seed: int,
    hp: HParams,
    *,
    splits: D.Splits | None = None,
    train_subset: int | None = None,
    evaluate_test: bool = True,
    on_eval=None,
    keep_model: bool = False,
    ctx=None,
    checkpoint: Path | None = None,
    stop=None,
) -> dict[str, Any]:
    """Train one run and return its metrics (and the model under ``"_model"`` when ``keep_model``).

    ``train_subset`` (HPO) trains on a seeded stratified subset of train. ``evaluate_test=False`` for HPO: the test
    split is then never touched. ``on_eval(step, val_metrics)`` may raise to prune. ``ctx``: where to run
    (``execution.Context``; None: as the config says). ``checkpoint``: the run's checkpoint directory
    (checkpoint.py): resumed from when it holds a checkpoint of this run, written every
    ``train.checkpoint_every_min`` minutes, on SIGTERM/SIGINT and when ``stop()`` (the time budget) says so; the
    caller removes it once the run is saved. Raises TrainingError (diverged, out of GPU memory), KeyboardInterrupt
    (signal; checkpoint written) and checkpoint.RunPaused (time budget; checkpoint written)."""
    from lorastudy.execution import active_run

    t_start = time.perf_counter()
    device = pick_device(cfg.train.device, ctx)
    mode = step_mode(cfg.train.fast_step, device)
    # setup
    s = seeded_model(cfg, task, method, seed, hp, device)
    data = prepare_data(cfg, task, s.tokenizer, splits=splits, train_subset=train_subset,
                        evaluate_test=evaluate_test, buckets=run_buckets(cfg, mode))
    state = RunState(cfg, task, method, seed, hp, data, on_eval)
    with active_run(device):  # the peak-memory counter covers every run of the process
        stepper = make_stepper(cfg, s, hp, state, mode)
        try:
            ckpt, best = None, None
            if checkpoint is not None:
                ckpt = LoneCheckpoint(cfg, checkpoint, CK.identity(cfg, task, method, seed, hp, path=mode,
                                                                   train_subset=train_subset,
                                                                   evaluate_test=evaluate_test,
                                                                   levers=stepper.lever_names), stop)
                _, best = ckpt.restore(state, stepper, s.model)
            # fit
            t_train = time.perf_counter()
            if ckpt is not None:
                ckpt.t_train = t_train
            try:
                best = fit(state, stepper, s.model, best, ckpt)
            except torch.cuda.OutOfMemoryError as e:
                raise TrainingError(f"{state.name}: GPU out of memory at batch size {hp.batch_size}, max_length "
                                    f"{cfg.data.max_length} ({e}); lower train.batch_size or data.max_length, or "
                                    "use fewer workers per GPU") from None
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # this run's stream only: others may be capturing
            train_time = ckpt.train_time() if ckpt is not None else time.perf_counter() - t_train
            # validate
            test = validate(state, stepper, s.model, best)
        finally:
            stepper.close()
        metrics = state.metrics(train_time=train_time, peak_memory_bytes=peak_memory(device), device=device,
                                amp=s.amp, mode=mode, trainable=s.trainable, total=s.total)
    metrics["step_levers"] = stepper.lever_names
    if test is not None:
        metrics.update(test)
    metrics["wall_time_s"] = time.perf_counter() - t_start
    if keep_model:
        metrics["_model"] = s.model
        metrics["_tokenizer"] = s.tokenizer
    return metrics


def write_failed(cfg, final_dir: Path, task: str, method: str, seed: int, hp: HParams,
                 error: BaseException) -> None:
    """FAILED.json beside the run directory (never inside it: a failed run never looks complete); the failure is
    also tracked (``tracking.backend``)."""
    from lorastudy import tracking

    failed = store.failed_marker(final_dir)
    store.atomic_write_json(failed, {"task": task, "method": method, "seed": seed, "error": str(error),
                                     "type": type(error).__name__, "hparams": asdict(hp)})
    tracking.log_run_dir(cfg, task, method, seed)  # after FAILED.json is written: tracking never costs a result


def save_run(cfg, method: str, metrics: dict[str, Any], model, final_dir: Path, tokenizer=None) -> None:
    """Write the run directory atomically (COMPLETE marker last): the adapter (LoRA, with its score head) or the
    whole model with its tokenizer and model card (modeling.save_model), metrics.json, the resolved config and the
    code version; removes a FAILED.json of an earlier try."""
    from lorastudy import tracking
    from lorastudy.config import dump_yaml

    final_dir = Path(final_dir)
    with store.staging_dir(final_dir) as tmp:
        if model is not None:
            sub = "adapter" if method == "lora" else "model"
            M.save_model(model.to("cpu"), tmp / sub, method, tokenizer, cfg=cfg, task=metrics["task"],
                         seed=metrics["seed"], final_path=final_dir / sub)
        store.atomic_write_json(tmp / "metrics.json", metrics)
        store.atomic_write_text(tmp / "config.yaml", dump_yaml(D.with_resolved_inputs(cfg, metrics["inputs"])))
        store.atomic_write_json(tmp / "code_version.json", store.code_version())
    store.failed_marker(final_dir).unlink(missing_ok=True)
    tracking.log_run_dir(cfg, metrics["task"], metrics["method"], metrics["seed"])  # after the run dir: tracking
    # never costs a result


def run_and_save(cfg, task: str, method: str, seed: int, hp: HParams, final_dir: Path, *,
                 splits: D.Splits | None = None, ctx=None, stop=None) -> dict[str, Any]:
    """Train and write the run directory atomically (COMPLETE marker last); a failure writes FAILED.json beside.
    The run checkpoints into ``<final_dir>.ckpt`` (resumed from there; removed once the run is saved); ``stop()``
    (the time budget) pauses it at a step boundary with checkpoint.RunPaused."""
    ckpt = CK.path_for(final_dir)
    try:
        m = train_run(cfg, task, method, seed, hp, splits=splits, keep_model=cfg.train.save_model, ctx=ctx,
                      checkpoint=ckpt, stop=stop)
    except CK.RunPaused:
        raise  # not a failure: the next invocation resumes it
    except Exception as e:
        write_failed(cfg, final_dir, task, method, seed, hp, e)
        raise
    model = m.pop("_model", None)
    tok = m.pop("_tokenizer", None)
    save_run(cfg, method, m, model, final_dir, tok)
    CK.remove(ckpt)
    return m
