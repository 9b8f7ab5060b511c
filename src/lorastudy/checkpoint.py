"""Mid-run checkpoints: a run saved at a step boundary, resumed later to exactly the same result.

A checkpoint lives beside the run directory it will become (``phase2/<task>/<method>/seed<N>.ckpt/``). It holds
what the rest of the run depends on: the trainable weights (LoRA: adapters and head; full FT: all), the optimizer
and learning-rate schedule state, the RNG states (the run's dropout generator, the process's torch generators, the
numpy generator of its data order and the order's position), early stopping, the curve, step and token counts, the
loss window since the last evaluation and the best-so-far weights. training.py (a lone run) and fused.py (a run in
a fused group's slot) decide what goes in; this module stores it:

* atomically: the directory is built under a temporary name (``store.staging_dir``: COMPLETE marker listing every
  file with its size and checksum, then a rename), so a half-written checkpoint is never loaded;
* tied to the run's identity (``identity``: config hash, task, method, seed, hyperparameters, the training path):
  a checkpoint of another identity is ignored, and said so, never loaded;
* removed when the run completes (``remove``).

Why torch.save and not safetensors: the optimizer and schedule states are nested dicts of tensors and numbers,
which safetensors (flat tensor maps) does not hold; files are read back with ``weights_only=True`` (no pickle
code execution).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lorastudy import store

log = logging.getLogger("lorastudy.checkpoint")

SUFFIX = ".ckpt"
STATE = "state.pt"
IDENTITY = "identity.json"
FORMAT = 1


def path_for(final_dir: Path) -> Path:
    """The checkpoint directory of the run that will be written to ``final_dir`` (its sibling ``<name>.ckpt``)."""
    final_dir = Path(final_dir)
    return final_dir.parent / f"{final_dir.name}{SUFFIX}"


def identity(cfg, task: str, method: str, seed: int, hp, *, path: str, train_subset: int | None = None,
             evaluate_test: bool = True, levers: list[str] | None = None,
             layout: list | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the config hash (everything that changes results), the run
    (task, method, seed), its hyperparameters (``training.HParams``), its training subset and test flag, the
    training ``path`` (eager | static | cuda_graph | fused-static | fused-cuda_graph: the fused step draws dropout
    masks differently, so its checkpoints do not resume a lone run and vice versa), and the step ``levers`` a lone
    run applies: the config hash leaves them out, but ``flat_optimizer`` keeps AdamW's state in another layout, so a
    run checkpointed with one set of levers is not resumed under another (recorded only when there are levers, so
    checkpoints written without any keep their identity; a fused group's levers do not change what it checkpoints).
    ``layout``: a fused group's weight buffers and their sizes (fused_step._Bank.layout), which its optimizer state
    follows: a checkpoint of another layout (an older lorastudy) is ignored and the run starts from scratch."""
    ident = {"format": FORMAT, "config_hash": cfg.hash(), "task": task, "method": method, "seed": int(seed),
             "hparams": asdict(hp), "train_subset": train_subset, "evaluate_test": bool(evaluate_test),
             "path": path}
    if levers:
        ident["levers"] = sorted(levers)
    if layout is not None:
        ident["layout"] = [list(x) for x in layout]
    return ident


def _differences(want: dict, got: dict) -> list[str]:
    keys = sorted(set(want) | set(got))
    return [f"{k}: {got.get(k)!r} != {want.get(k)!r}" for k in keys if want.get(k) != got.get(k)]


def save(path: Path, ident: dict[str, Any], payload: dict[str, Any]) -> None:
    """Write the checkpoint ``path`` atomically (replacing an older one): ``identity.json`` and ``state.pt``
    (``payload``: tensors, numbers, strings, lists and dicts of them; tensors are stored on the CPU). A failed
    write raises store.StoreError naming the path and the cause."""
    payload = _to_cpu(payload)
    with store.staging_dir(path) as tmp:
        torch.save(payload, tmp / STATE)
        store.atomic_write_json(tmp / IDENTITY, ident)


def load(path: Path, ident: dict[str, Any], warn: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The payload of the checkpoint ``path`` when it exists, is complete and intact (its COMPLETE marker's list
    matches) and has identity ``ident``; otherwise None. A checkpoint that exists but cannot be used (incomplete,
    corrupted, of another identity) is ignored and ``warn`` (default: this module's logger) says why; it is
    overwritten by the run's next checkpoint."""
    path = Path(path)
    if not path.exists():
        return None
    say = warn or log.warning
    if not store.is_complete(path):
        say(f"checkpoint {path} is incomplete or corrupted: ignored (the run starts from scratch)")
        return None
    try:
        got = json.loads((path / IDENTITY).read_text())
    except (OSError, ValueError) as e:
        say(f"checkpoint {path}: unreadable identity ({e}): ignored (the run starts from scratch)")
        return None
    diff = _differences(ident, got)
    if diff:
        say(f"checkpoint {path} belongs to another run or config ({'; '.join(diff[:3])}): ignored, not loaded "
            "(the run starts from scratch)")
        return None
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state means: start from scratch
        say(f"checkpoint {path}: unreadable state ({type(e).__name__}: {e}): ignored (the run starts from scratch)")
        return None


def remove(path: Path | None) -> None:
    """Delete a checkpoint (the run completed); no error when there is none."""
    if path is not None and Path(path).exists():
        shutil.rmtree(path, ignore_errors=True)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()  # no copy of CPU tensors: torch.save writes their values now (full FT: GBs)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# -- when to write one -------------------------------------------------------------------------------------------
class Policy:
    """When a training loop writes a checkpoint, asked at every step boundary (``due()``):

    * ``"interrupt"``: SIGTERM/SIGINT was received (execution.interrupt_requested): write, then stop (exit 130);
    * ``"stop"``: ``stop()`` says the time budget is spent: write, then pause the run (the next invocation resumes);
    * ``"periodic"``: ``every_min`` minutes (``train.checkpoint_every_min``; 0 = never) since the last one: write and
      go on."""

    def __init__(self, every_min: float, stop: Callable[[], bool] | None = None) -> None:
        self.every_s = every_min * 60.0
        self.stop = stop
        self.last = time.monotonic()

    def due(self) -> str | None:
        from lorastudy.execution import interrupt_requested

        if interrupt_requested():
            return "interrupt"
        if self.stop is not None and self.stop():
            return "stop"
        if self.every_s > 0 and time.monotonic() - self.last >= self.every_s:
            return "periodic"
        return None

    def written(self) -> None:
        self.last = time.monotonic()


class RunPaused(Exception):  # noqa: N818 - not an error: the run stopped on purpose with its checkpoint written
    """A run stopped at a step boundary because the time budget ran out; its checkpoint is at ``path``."""

    def __init__(self, name: str, path: Path, step: int) -> None:
        super().__init__(f"{name}: paused at step {step}, checkpoint {path}")
        self.name, self.path, self.step = name, Path(path), step


# -- state helpers -----------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict[str, Any]:
    """The process's torch generators (CPU, and the device's CUDA generator when on CUDA)."""
    out: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    """Restore ``rng_state``. The CUDA generator is set under the capture lock: setting it while another thread of
    the process captures a CUDA graph would fail."""
    from lorastudy.execution import CAPTURE_LOCK

    torch.set_rng_state(st["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in st:
        with CAPTURE_LOCK:
            torch.cuda.set_rng_state(st["torch_cuda"], device)


@torch.no_grad()
def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """``opt.load_state_dict(sd)``, except that state tensors and tensor learning rates that already exist are
    written in place: a captured CUDA graph (fast_step, fused_step) reads them at fixed addresses, and
    ``load_state_dict`` would replace them with new tensors the graph never sees. Raises ValueError when ``sd``
    is of another parameter layout."""
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = [i for g in sd["param_groups"] for i in g["params"]]
    if len(params) != len(saved) or len(opt.param_groups) != len(sd["param_groups"]):
        raise ValueError(f"optimizer state of {len(saved)} parameters in {len(sd['param_groups'])} groups, "
                         f"this optimizer has {len(params)} in {len(opt.param_groups)}")
    if not any(opt.state.get(p) for p in params):
        opt.load_state_dict(sd)  # nothing captured yet: the library's own loader (casts, devices)
        return
    for i, p in zip(saved, params, strict=True):
        st = sd["state"].get(i, {})
        cur = opt.state[p]
        for k, v in st.items():
            if isinstance(cur.get(k), torch.Tensor) and isinstance(v, torch.Tensor):
                cur[k].copy_(v)
            else:
                cur[k] = v.to(p.device) if isinstance(v, torch.Tensor) and k != "step" else v
    for g, sg in zip(opt.param_groups, sd["param_groups"], strict=True):
        for k, v in sg.items():
            if k == "params":
                continue
            if isinstance(g.get(k), torch.Tensor):
                g[k].copy_(torch.as_tensor(v))
            else:
                g[k] = v
