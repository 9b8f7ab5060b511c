"""One fine-tuning run: (task, method, seed, hyperparameters) -> trained model + metrics.

Read it top to bottom: ``train_run`` sets up, loops over length-grouped batches, evaluates on the validation split a
few times per epoch, stops early on validation loss, restores the best weights and evaluates the test split once.

No host sync inside the step: the running loss stays on the device and is read at evaluation points only; a NaN/inf
anywhere in the window makes that sum non-finite, so divergence is still caught. On CUDA the step and the evaluation
forward are replayed as CUDA graphs over static padded shapes (``train.fast_step``, see fast_step.py); ``train_step``
below is the eager reference path.
"""

from __future__ import annotations

import math
import os
import random
import resource
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy import store
from lorastudy.fast_step import StaticForward, StaticTrainStep, default_buckets, fuse_rms_norms

# Runs may share a process (workers.run_units with streams > 1): seeding and building a model hold this lock, so
# each run's initial weights come from its own seed whatever the other threads draw meanwhile.
_INIT_LOCK = threading.Lock()
_ACTIVE = {"runs": 0}  # runs training in this process now (guarded by _INIT_LOCK)


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
        t = cfg.train
        if method not in t.lr:
            raise ValueError(f"train.lr has no entry for method {method!r}")
        hp = cls(t.lr[method], t.batch_size, t.epochs, t.warmup_ratio, t.weight_decay, cfg.lora.alpha,
                 cfg.lora.dropout, t.max_steps)
        for k, v in (overrides or {}).items():
            if not hasattr(hp, k):
                raise ValueError(f"unknown hyperparameter {k!r}; known: {list(asdict(hp))}")
            setattr(hp, k, type(getattr(hp, k))(v) if getattr(hp, k) is not None and v is not None else v)
        return hp


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(spec: str) -> torch.device:
    """``auto`` = CUDA when available. The worker pool sets LORASTUDY_DEVICE (e.g. cuda:3) to spread runs over
    GPUs; it overrides ``auto`` and a bare ``cuda``, not an explicit ``cuda:N`` or ``cpu``."""
    if spec in ("auto", "cuda") and os.environ.get("LORASTUDY_DEVICE"):
        return torch.device(os.environ["LORASTUDY_DEVICE"])
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# -- evaluation --------------------------------------------------------------------------------------------------
def f1_binary(labels: np.ndarray, preds: np.ndarray, positive: int = 1) -> float:
    tp = int(((preds == positive) & (labels == positive)).sum())
    fp = int(((preds == positive) & (labels != positive)).sum())
    fn = int(((preds != positive) & (labels == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


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


def scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    preds = logits.argmax(-1)
    loss = float(F.cross_entropy(torch.as_tensor(logits), torch.tensor(labels)).item())
    return {"loss": loss, "accuracy": float((preds == labels).mean()), "f1": f1_binary(labels, preds)}


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


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: max RSS of the process


# -- the run -----------------------------------------------------------------------------------------------------
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
) -> dict[str, Any]:
    """Train one run and return its metrics (and the model under ``"_model"`` when ``keep_model``).

    ``train_subset`` (HPO) trains on a seeded stratified subset of train. ``evaluate_test=False`` for HPO: the test
    split is then never touched. ``on_eval(step, val_metrics)`` may raise to prune.
    """
    t_start = time.perf_counter()
    spec = cfg.task(task)
    splits = splits or D.splits_for(cfg, task)
    train_df = D.subset(splits.train, train_subset, cfg.data.split_seed, f"{task}-hpo") if train_subset \
        else splits.train
    device = pick_device(cfg.train.device)
    with _INIT_LOCK:
        seed_everything(seed)
        s = build_model(cfg, task, method, seed, hp, device)
        M.seed_dropout(s.model, seed, device)  # the run's own dropout generator (see modeling.SeededDropout)
        _ACTIVE["runs"] += 1
        alone = _ACTIVE["runs"] == 1
    try:
        tok, pad, side = s.tokenizer, s.tokenizer.pad_token_id, cfg.model.padding_side
        L = cfg.data.max_length
        mode = step_mode(cfg.train.fast_step, device)
        buckets = cfg.train.shape_buckets or (default_buckets(L) if mode != "eager" else None)
        if mode != "eager":  # every batch must land in a bucket: a graph per stray width would pile up
            buckets = sorted(set(buckets) | {L})
        enc_train, enc_val = D.encode(tok, train_df, spec, L), D.encode(tok, splits.validation, spec, L)
        if len(enc_train) == 0 or len(enc_val) == 0:
            raise TrainingError(f"{task}: empty train or validation split")

        opt = make_optimizer(s.model, hp, device, graphs=mode == "cuda_graph")
        steps_per_epoch = math.ceil(len(enc_train) / hp.batch_size)
        total_steps = math.ceil(hp.epochs * steps_per_epoch)
        if hp.max_steps:
            total_steps = min(total_steps, hp.max_steps)
        sched = get_linear_schedule_with_warmup(opt, int(round(hp.warmup_ratio * total_steps)), total_steps)
        eval_every = max(1, steps_per_epoch // cfg.train.evals_per_epoch)
        if device.type == "cuda" and alone:
            # the peak is per process: reset only when no other run of this process is under way, so that with
            # several runs per process (--streams) it covers all of them (peak_memory_scope = "process")
            torch.cuda.reset_peak_memory_stats(device)
        fast = runner = None
        if mode != "eager":  # static shapes; CUDA graphs unless mode == "static" (see fast_step.py)
            fuse_rms_norms(s.model)  # fewer kernels, same computation (the model is this run's own)
            fast = StaticTrainStep(s.model, s.params, opt, hp.batch_size, cfg.train.max_grad_norm, s.amp, device,
                                   cuda_graph=mode == "cuda_graph")
            runner = StaticForward(s.model, cfg.train.eval_batch_size, s.amp, device, cuda_graph=mode == "cuda_graph")

        rng = np.random.default_rng(seed)
        lengths = enc_train.lengths()
        labels_all = torch.tensor(enc_train.labels)
        curve: list[dict] = []
        best = {"loss": math.inf, "step": 0, "state": None}
        bad_evals, step, tokens = 0, 0, 0
        run_loss, run_n = torch.zeros((), device=device), 0
        stopped_early = False
        t_train = time.perf_counter()

        def evaluate(step: int) -> bool:
            """Validation pass; returns True when early stopping fires."""
            nonlocal run_loss, run_n, bad_evals
            if fast is not None:
                run_loss, run_n = fast.take_loss()
            train_loss = float(run_loss.item()) / max(run_n, 1)  # the one host sync per evaluation window
            if not math.isfinite(train_loss):
                raise TrainingError(f"{task}/{method}/seed{seed}: non-finite training loss before step {step} "
                                    f"(lr={hp.lr}); the run is marked failed")
            run_loss, run_n = torch.zeros((), device=device), 0
            val = scores(predict(s.model, enc_val, pad, side, cfg.train.eval_batch_size, device, s.amp, buckets,
                                 runner), enc_val.labels)
            if not math.isfinite(val["loss"]):
                raise TrainingError(f"{task}/{method}/seed{seed}: non-finite validation loss at step {step}")
            curve.append({"step": step, "epoch": step / steps_per_epoch, "train_loss": train_loss,
                          "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_f1": val["f1"],
                          "lr": float(sched.get_last_lr()[0])})
            if on_eval is not None:
                on_eval(step, val)
            if val["loss"] < best["loss"]:
                best.update(loss=val["loss"], step=step, val=val,
                            state={n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad})
                bad_evals = 0
            else:
                bad_evals += 1
            return bad_evals >= cfg.train.patience

        try:
            epoch = 0
            while step < total_steps and not stopped_early:
                for idx in (D.length_grouped_order(lengths, hp.batch_size, rng) if cfg.train.group_by_length
                            else [b for b in np.array_split(rng.permutation(len(lengths)),
                                                            steps_per_epoch)]):
                    pad_to = D.bucket_width(int(lengths[idx].max()), buckets)
                    cpu_batch = D.collate([enc_train.input_ids[i] for i in idx], pad, side, pad_to)
                    if fast is not None:
                        fast.step(cpu_batch, labels_all[torch.as_tensor(idx)])
                        sched.step()
                    else:
                        y = labels_all[torch.as_tensor(idx)].to(device, non_blocking=True)
                        run_loss += train_step(s, opt, sched, to_device(cpu_batch, device), y, cfg.train.max_grad_norm)
                        run_n += 1
                    tokens += int(lengths[idx].sum())
                    step += 1
                    if step % eval_every == 0 or step == total_steps:
                        if evaluate(step):
                            stopped_early = True
                            break
                    if step >= total_steps:
                        break
                epoch += 1
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingError(f"{task}/{method}/seed{seed}: GPU out of memory at batch size {hp.batch_size}, "
                                f"max_length {L} ({e}); lower train.batch_size or data.max_length, or use fewer "
                                "workers per GPU") from None
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # this run's stream only: others may be capturing
        train_time = time.perf_counter() - t_train
        if fast is not None:
            fast.close()

        # restore the best checkpoint (by validation loss) before the one test evaluation
        with torch.no_grad():
            for n, p in s.model.named_parameters():
                if n in best["state"]:
                    p.copy_(best["state"][n])
        metrics: dict[str, Any] = {
            "task": task, "method": method, "seed": seed, "hparams": asdict(hp),
            "best_step": best["step"], "steps": step, "total_steps_planned": total_steps,
            "stopped_early": stopped_early,
            "validation": best["val"], "curve": curve,
            "train_time_s": train_time, "tokens_per_s": tokens / max(train_time, 1e-9), "train_tokens": tokens,
            # process-wide: with several runs per process (--streams) it covers all of them
            "peak_memory_bytes": peak_memory(device), "peak_memory_scope": "process", "device": str(device),
            "precision": "bf16-autocast" if s.amp else "fp32", "step_mode": mode,
            "trainable_params": s.trainable, "total_params": s.total,
            "n_train": len(enc_train), "n_validation": len(enc_val),
        }
        if evaluate_test:
            enc_test = D.encode(tok, splits.test, spec, L)
            logits = predict(s.model, enc_test, pad, side, cfg.train.eval_batch_size, device, s.amp, buckets, runner)
            test = scores(logits, enc_test.labels)
            maj = majority_accuracy(enc_train.labels, enc_test.labels)
            metrics.update({
                "test": test, "n_test": len(enc_test), "majority_accuracy": maj,
                # the known full-FT failure mode on RTE/MRPC: reported, never dropped
                "collapsed": bool(test["accuracy"] <= maj),
                "test_predictions": logits.argmax(-1).tolist(), "test_labels": enc_test.labels.tolist(),
                "test_idx": splits.test["idx"].tolist(),
            })
        if runner is not None:
            runner.close()
        metrics["wall_time_s"] = time.perf_counter() - t_start
        if keep_model:
            metrics["_model"] = s.model
            metrics["_tokenizer"] = tok
        return metrics
    finally:
        with _INIT_LOCK:
            _ACTIVE["runs"] -= 1


def run_and_save(cfg, task: str, method: str, seed: int, hp: HParams, final_dir: Path, *,
                 splits: D.Splits | None = None) -> dict[str, Any]:
    """Train and write the run directory atomically (COMPLETE marker last); a failure writes FAILED.json beside."""
    from lorastudy.config import dump_yaml

    final_dir = Path(final_dir)
    failed = final_dir.parent / f"{final_dir.name}.{store.FAILED}"
    try:
        m = train_run(cfg, task, method, seed, hp, splits=splits, keep_model=cfg.train.save_model)
    except Exception as e:
        store.atomic_write_json(failed, {"task": task, "method": method, "seed": seed, "error": str(e),
                                         "type": type(e).__name__, "hparams": asdict(hp)})
        raise
    model = m.pop("_model", None)
    tok = m.pop("_tokenizer", None)
    with store.staging_dir(final_dir) as tmp:
        if model is not None:
            sub = "adapter" if method == "lora" else "model"
            M.save_model(model.to("cpu"), tmp / sub, method, tok, cfg=cfg, task=task, seed=seed,
                         final_path=final_dir / sub)
        store.atomic_write_json(tmp / "metrics.json", m)
        store.atomic_write_text(tmp / "config.yaml", dump_yaml(cfg))
        store.atomic_write_json(tmp / "code_version.json", store.code_version())
    failed.unlink(missing_ok=True)
    return m
