"""Layer-wise representations on the fixed probe set (phase 3).

Per layer — embeddings, every decoder layer, final norm — two poolings:
- ``last``: the hidden state of the token the classifier reads (``modeling.read_index``: the last position of the
  attention mask, also when pad = eos and an input ends in eos; primary);
- ``mean``: the mean over non-pad tokens excluding BOS (secondary).
Both are masked from the attention mask, so left and right padding give the same vectors. Saved as safetensors
(float32 or float16) with metadata: model, run, probe hash, pooling, layer names.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy import store

POOLINGS = ("last", "mean")
FILE = "representations.safetensors"


def layer_modules(model) -> tuple[list[str], list[torch.nn.Module]]:
    bb = M.backbone(model)
    names = ["embeddings"] + [f"layer{i}" for i in range(len(bb.layers))] + ["final_norm"]
    return names, [bb.embed_tokens, *bb.layers, bb.norm]


def pool(hidden: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor, bos_id: int | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(last token, mean over non-pad tokens except a leading BOS) for a [b, s, d] batch; "last" is the token the
    classifier reads (``modeling.read_index``: the last position of the attention mask)."""
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), M.read_index(mask)]
    m = mask.clone()
    if bos_id is not None:
        first_idx = mask.argmax(-1)  # first real token, for left or right padding
        rows = torch.arange(mask.shape[0], device=mask.device)
        is_bos = input_ids[rows, first_idx] == bos_id
        m[rows[is_bos], first_idx[is_bos]] = 0
    m = m.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return last, mean


@torch.no_grad()
def extract(model, tokenizer, input_ids: list[list[int]], *, padding_side: str = "right", batch_size: int = 32,
            device: torch.device | str = "cpu", amp: torch.dtype | None = None, progress=None
            ) -> dict[str, np.ndarray]:
    """{"last": [L, n, d], "mean": [L, n, d]} float32, rows in the order of ``input_ids``."""
    device = torch.device(device)
    model.eval().to(device)
    names, mods = layer_modules(model)
    captured: list[torch.Tensor | None] = [None] * len(mods)

    def hook(i):
        def fn(_mod, _inp, out):
            captured[i] = out[0] if isinstance(out, tuple) else out
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(mods)]
    n = len(input_ids)
    lengths = np.array([len(s) for s in input_ids])
    out = {p: None for p in POOLINGS}
    bos = tokenizer.bos_token_id
    try:
        for idx in D.sequential_batches(lengths, batch_size):
            b = {k: v.to(device) for k, v in D.collate([input_ids[i] for i in idx], tokenizer.pad_token_id,
                                                       padding_side).items()}
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                M.classifier_logits(model, b)
            for li, h in enumerate(captured):
                last, mean = pool(h.float(), b["attention_mask"], b["input_ids"], bos)
                for p, v in (("last", last), ("mean", mean)):
                    if out[p] is None:
                        out[p] = np.zeros((len(mods), n, v.shape[-1]), dtype=np.float32)
                    out[p][li, idx] = v.cpu().numpy()
            if progress is not None:
                progress(len(idx))
    finally:
        for h in handles:
            h.remove()
    out["layer_names"] = names
    return out


def save(path: Path, reps: dict, meta: dict, dtype: str = "float32") -> None:
    """Atomic write of a representations file (temp name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {p: np.ascontiguousarray(reps[p].astype(dtype)) for p in POOLINGS}
    md = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in
          {**meta, "layer_names": reps["layer_names"], "dtype": dtype, "poolings": list(POOLINGS)}.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=md)
        store.publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_meta(path: Path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        md = f.metadata() or {}
    out = {}
    for k, v in md.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    return load_file(str(path)), read_meta(path)


# -- phase 3 over a study --------------------------------------------------------------------------------------------
def _extracted(out: Path, phash: str, log=None) -> bool:
    """A finished representations file of this probe set (a corrupted one counts as not finished)."""
    if not out.is_file():
        return False
    try:
        return read_meta(out).get("probe_hash") == phash
    except Exception:
        if log is not None:
            log(f"{out}: unreadable, recomputing")
        return False


def extract_study(cfg, batch_size: int | None = None, progress=None, log=print, stop=None,
                  set_total=None) -> dict:
    """Base model and every complete phase-2 run, per task, on the fixed probe set. Finished files are skipped;
    ``stop()`` (a time budget) is checked before each model; ``set_total(rows)`` is told the probe rows still to
    extract (for the progress bar's ETA) once they are known."""
    from lorastudy import store
    from lorastudy.training import amp_dtype, pick_device

    device = pick_device(cfg.train.device)
    amp = amp_dtype(cfg.train.precision, device)
    bs = batch_size or cfg.extract.batch_size
    done, skipped, missing = [], [], []
    tok = M.load_tokenizer(cfg.model)
    units = [("base", None, None)] + [(f"{m}/seed{s}", m, s) for m in cfg.methods for s in cfg.seeds]

    # one pass decides every unit (already extracted / run missing / to extract), so the progress total is known
    # before the first model loads
    plans, todo_rows = [], 0
    for task in cfg.tasks:
        probe = D.probe_set(D.splits_for(cfg, task), cfg.data.probe_size)
        phash, enc = D.probe_hash(probe), D.encode(tok, probe, cfg.task(task), cfg.data)
        decided = []
        for name, method, seed in units:
            out = store.rep_dir(cfg.out, task, method, seed) / FILE
            rd = None if method is None else store.run_dir(cfg.out, task, method, seed)
            sub = None if rd is None else rd / ("adapter" if method == "lora" else "model")
            if _extracted(out, phash, log):
                state = "skip"
            elif rd is not None and not (store.is_complete(rd) and sub.exists()):
                state = "missing"
            else:
                state, todo_rows = "extract", todo_rows + len(enc)
            decided.append((name, method, seed, out, rd, sub, state))
        plans.append((task, probe, phash, enc, decided))
    if set_total is not None:
        set_total(todo_rows)
    for task, probe, phash, enc, decided in plans:
        spec = cfg.task(task)
        pdir = cfg.out / "phase3" / task
        inputs = D.input_format(tok, cfg.data, spec)
        store.atomic_write_json(pdir / "probe.json", {"probe_hash": phash, "probe_ids": probe["probe_id"].tolist(),
                                                     "labels": probe["label"].tolist(),
                                                     "max_length": cfg.data.max_length, "inputs": inputs})
        for name, method, seed, out, rd, sub, state in decided:
            if stop is not None and stop():
                log("extract: time budget exhausted; rerun to continue")
                return {"extracted": done, "skipped_existing": skipped, "missing_runs": missing}
            if state == "skip":
                skipped.append(f"{task}/{name}")
                continue
            if state == "missing":
                missing.append(f"{task}/{name}")
                continue
            if method is None:
                model, _ = M.load_base(cfg.model, spec.num_labels, seed=0, tokenizer=tok)
                run = "base"
            else:
                model, _ = M.load_trained(cfg.model, spec.num_labels, sub, method, tokenizer=tok)
                run = str(rd)
            reps = extract(model, tok, enc.input_ids, padding_side=cfg.model.padding_side, batch_size=bs,
                           device=device, amp=amp, progress=progress)
            save(out, reps, {"model": cfg.model.source, "run": run, "task": task, "method": method or "base",
                             "seed": "" if seed is None else str(seed), "probe_hash": phash,
                             "n": str(len(enc)), "inputs": inputs,
                             "pooling": "last=the token the classifier reads (last position of the attention "
                                        "mask); mean=non-pad tokens excluding BOS"}, cfg.extract.dtype)
            done.append(f"{task}/{name}")
            del model
    if missing:
        log(f"extract: no complete phase-2 run for {', '.join(missing)} (skipped)")
    return {"extracted": done, "skipped_existing": skipped, "missing_runs": missing}
