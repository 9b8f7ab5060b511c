"""The vLLM side of the serving benchmark: whether vLLM is there and which way it serves the heads, the model and
adapter directories it reads, and its two worker processes (merged in vLLM; base + adapters in vLLM).

How the heads are served is chosen by the installed version and recorded with the results (``heads_mode``):
(a) vLLM >= 0.31 serves each adapter's saved ``score`` head (PEFT ``modules_to_save``, vllm-project/vllm#53555)
when every head has the base head's label count (mixed label counts are vllm-project/vllm#57766, open); (b) vLLM
0.26-0.30 refuses such adapters, so the backbone LoRA is exported without its head and the heads are applied
outside vLLM. vLLM is never imported here (its import takes ~17 s and starts CUDA): a cheap probe subprocess finds
it and reads its version from the package metadata, in the same environment the workers get.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from packaging.version import Version
from safetensors.torch import save_file

from lorastudy.serving import export as X
from lorastudy.serving.build import merged_model
from lorastudy.serving.vllm_engine import max_lora_rank
from lorastudy.serving.worker import WorkerClient, WorkerError, WorkerUnavailable

MIN_VERSION, HEADS_VERSION = Version("0.26"), Version("0.31")
WORKER_MODULE = "lorastudy.serving.vllm_worker"
ADAPTERS, MERGED = "vllm", "merged-vllm"  # record labels: base + adapters in vLLM; merged in vLLM
PROBE = ("import importlib.util, importlib.metadata, json\n"
         "spec = importlib.util.find_spec('vllm')\n"
         "try:\n    version = importlib.metadata.version('vllm') if spec else None\n"
         "except importlib.metadata.PackageNotFoundError:\n    version = None\n"
         "print(json.dumps({'found': spec is not None, 'version': version}))\n")


@dataclass
class VllmOptions:
    """Settings of the vLLM workers (``config.ServeConfig``'s ``vllm_*`` fields)."""

    cuda_graphs: bool = True
    start_timeout_s: float = 600.0
    gpu_memory_utilization: float = 0.25
    python: str = sys.executable


def probe(python: str = sys.executable) -> dict:
    """{"found": bool, "version": str | None} for vLLM in ``python``'s environment, without importing it."""
    try:
        out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError, OSError) as e:
        return {"found": False, "version": None, "error": f"{type(e).__name__}: {e}"}


def heads_mode(version: str | None, label_counts: list[int]) -> tuple[str | None, str]:
    """("vllm" | "outside" | None, why) for an installed vLLM ``version`` and the adapters' label counts; None:
    this version cannot run the engine."""
    if version is None:
        return None, "vLLM's version is unknown (no package metadata)"
    v = Version(version)
    if v < MIN_VERSION:
        return None, f"vLLM {v} is older than {MIN_VERSION}, the oldest release this engine was written against"
    if v >= HEADS_VERSION:
        if len(set(label_counts)) == 1:
            return "vllm", f"vLLM {v} >= {HEADS_VERSION}: the adapters as saved, each head served by vLLM"
        return "outside", (f"vLLM {v} >= {HEADS_VERSION} serves saved heads only when they all have the base head's "
                           f"label count (these have {sorted(set(label_counts))}): heads applied outside vLLM")
    return "outside", (f"vLLM {v} (< {HEADS_VERSION}) refuses adapters with modules_to_save: backbone LoRA only "
                       "(head stripped), each row's own head applied outside vLLM as one gathered matmul")


def _lists(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"].cpu().tolist(), "attention_mask": batch["attention_mask"].cpu().tolist()}


class VllmRun:
    """The two vLLM workers of one benchmark run. ``start`` exports the directories and starts both workers
    (their start-ups overlap each other and the caller's own engine building); ``ready`` waits for them. When
    vLLM is missing or a worker fails, ``status`` says why and the vLLM rows are skipped."""

    def __init__(self, base, adapters, targets: list[str], batches: dict[str, dict], conditions: dict[str, dict],
                 seq_len: int, max_batch: int, dtype: torch.dtype, opts: VllmOptions, log=print,
                 capture_tokens: list[int] | None = None):
        self.base, self.adapters, self.targets = base, adapters, targets
        self.batches, self.conditions, self.capture_tokens = batches, conditions, capture_tokens or []
        self.seq_len, self.max_batch, self.dtype, self.opts, self.log = seq_len, max_batch, dtype, opts, log
        self.workers: dict[str, WorkerClient] = {}
        self.status: dict = {"status": "not started"}
        self.tmp: Path | None = None

    # -- setup -----------------------------------------------------------------------------------------------------
    def start(self) -> bool:
        """Probe, export, start the workers. False (and ``status``) when vLLM cannot run here."""
        found = probe(self.opts.python)
        if not found.get("found"):
            why = found.get("error") or "not installed"
            return self._skip(f"vLLM is not importable ({why}); the vllm rows are skipped")
        counts = [a.num_labels for a in self.adapters]
        heads, why = heads_mode(found.get("version"), counts)
        if heads is None:
            return self._skip(f"{why}; the vllm rows are skipped")
        self.status = {"status": "starting", "version": found["version"], "heads": heads, "heads_reason": why}
        self.tmp = Path(tempfile.mkdtemp(prefix="lorastudy-vllm-"))
        common = self._common()
        adapters_spec = {**common, "mode": "adapters", "heads": heads,
                         "conditions": {c: v for c, v in self.conditions.items() if v["worker"] == ADAPTERS},
                         **self._export_adapters(heads)}
        merged_spec = {**common, "mode": "merged", "num_labels": self.adapters[0].num_labels,
                       "model_dir": str(X.export_classifier(merged_model(self.base, self.adapters[0]),
                                                            self.tmp / "merged")),
                       "conditions": {c: v for c, v in self.conditions.items() if v["worker"] == MERGED}}
        for label, spec in ((MERGED, merged_spec), (ADAPTERS, adapters_spec)):
            path = self.tmp / f"{label}.json"
            path.write_text(json.dumps(spec))
            self.workers[label] = WorkerClient([self.opts.python, "-m", WORKER_MODULE, str(path)], label).start()
        self.log(f"serve-bench: vLLM {found['version']}: {why}; starting its two engines (one per process)")
        return True

    def _common(self) -> dict:
        cfg = self.base.config
        kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * \
            (cfg.hidden_size // cfg.num_attention_heads) * torch.finfo(self.dtype).bits // 8
        length = -(-max(self.seq_len, 16) // 16) * 16  # whole KV blocks of 16 tokens
        need = kv_per_token * length * self.max_batch
        return {"dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(self.dtype, "float32"),
                "cuda_graphs": self.opts.cuda_graphs, "capture_tokens": self.capture_tokens,
                "max_model_len": length, "max_num_seqs": self.max_batch,
                "kv_cache_bytes": max(64 * 2**20, 2 * need),
                "gpu_memory_utilization": self.opts.gpu_memory_utilization,
                "batches": {k: _lists(v) for k, v in self.batches.items()}}

    def _export_adapters(self, heads: str) -> dict:
        saved = {a.name: a.path for a in self.adapters if getattr(a, "path", None)}
        missing = [a for a in self.adapters if a.name not in saved]
        if missing:  # synthetic adapters: saved by PEFT first, as a training run saves them
            saved.update(X.save_adapters(self.base, missing, self.targets, self.tmp / "saved"))
        spec: dict = {"max_lora_rank": max_lora_rank(max(next(iter(a.lora.values()))[0].shape[0]
                                                         for a in self.adapters))}
        if heads == "vllm":
            spec["model_dir"] = str(X.export_classifier(self.base, self.tmp / "base", self.adapters[0].num_labels))
            spec["adapters"] = [{"name": a.name, "num_labels": a.num_labels,
                                 "path": str(X.copy_adapter(saved[a.name], self.tmp / "lora" / a.name))}
                                for a in self.adapters]
            return spec
        spec["model_dir"] = str(X.export_backbone(self.base, self.tmp / "backbone"))
        heads_t, spec["adapters"] = {}, []
        for i, a in enumerate(self.adapters):
            out = self.tmp / "lora" / a.name
            head = X.strip_head(saved[a.name], out)
            heads_t[f"head_{i}"] = head["weight"].float().contiguous()
            spec["adapters"].append({"name": a.name, "num_labels": a.num_labels, "path": str(out)})
        save_file(heads_t, self.tmp / "heads.safetensors")
        spec["heads_file"] = str(self.tmp / "heads.safetensors")
        return spec

    def ready(self) -> bool:
        """Wait for both workers; False (``status`` says why, workers closed) when one cannot run."""
        if not self.workers:
            return False
        try:
            info = {label: w.wait_ready(self.opts.start_timeout_s) for label, w in self.workers.items()}
        except WorkerUnavailable as e:
            self.close()
            return self._skip(f"vLLM could not run here ({e}); the vllm rows are skipped")
        except WorkerError as e:
            self.close()
            self.status = {**self.status, "status": "failed", "error": str(e)}
            self.log(f"serve-bench: a vLLM worker failed; the vllm rows are skipped:\n{e}")
            return False
        self.status = {**self.status, "status": "ran", "workers": info}
        return True

    def _skip(self, why: str) -> bool:
        self.status = {**self.status, "status": "skipped", "reason": why}
        self.log(f"serve-bench: {why}")
        return False

    # -- use ---------------------------------------------------------------------------------------------------------
    def request(self, label: str, cmd: str, **args) -> dict:
        timeout = 120.0 + 2.0 * int(args.get("n", 1))
        return self.workers[label].request(cmd, timeout=timeout, **args)

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        self.workers = {}
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
