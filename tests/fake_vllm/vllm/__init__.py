"""A stand-in for vLLM's offline pooling API (tests only): the subset lorastudy's ``vllm`` engine calls, with the
0.26 semantics that matter, computed with Hugging Face on the CPU.

What it mirrors (vLLM 0.26 source: entrypoints/llm.py, entrypoints/pooling/offline.py, lora/peft_helper.py,
lora/utils.py, model_executor/models/adapters.py): ``LLM(model, runner="pooling", convert="embed"|"classify", ...)``;
``LLM.encode(prompts, pooling_params=, lora_request=, pooling_task=, use_tqdm=)`` returning outputs whose
``.outputs.data`` is the pooled tensor; ``TokensPrompt`` prompts; LAST pooling of each prompt (no padding: each
sequence on its own); ``use_activation=False`` = raw hidden state / raw logits; LoRA adapters read from
``adapter_model.safetensors`` with names ``base_model.model.<vLLM module>.lora_A/B.weight`` and scaling
``lora_alpha / r``; adapters with ``modules_to_save`` refused before 0.31 ("vLLM only supports modules_to_save being
None."); from 0.31 a saved ``score`` head served per request when its label count matches the base head's.
Unknown keyword arguments raise, like EngineArgs. The version comes from the package metadata that the test
fixture writes beside this package.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import version as _version
from pathlib import Path

import torch

__version__ = _version("vllm")
CALLS: list[dict] = []  # every LLM(...) made in this process, its keyword arguments (tests read them)

_ENGINE_ARGS = {"runner", "convert", "dtype", "pooler_config", "enforce_eager", "enable_prefix_caching",
                "skip_tokenizer_init", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                "kv_cache_memory_bytes", "gpu_memory_utilization", "seed", "enable_lora", "max_loras",
                "max_cpu_loras", "max_lora_rank", "compilation_config"}
_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _ver() -> tuple[int, ...]:
    return tuple(int(x) for x in __version__.split(".")[:2])


class PoolingParams:
    def __init__(self, use_activation: bool | None = None):
        self.use_activation = use_activation


def TokensPrompt(prompt_token_ids: list[int]) -> dict:  # a TypedDict in vLLM
    return {"prompt_token_ids": list(prompt_token_ids)}


class _Out:
    def __init__(self, data: torch.Tensor, ids: list[int]):
        self.outputs = type("PoolingOutput", (), {"data": data})()
        self.prompt_token_ids = ids


class LLM:
    def __init__(self, model: str, **kw):
        bad = set(kw) - _ENGINE_ARGS
        if bad:
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {sorted(bad)}")
        CALLS.append({"model": model, **kw})
        if kw.get("runner") != "pooling" or kw.get("convert") not in ("embed", "classify"):
            raise ValueError(f"fake vLLM serves pooling models only, got runner={kw.get('runner')!r}")
        pc = kw.get("pooler_config")
        if pc is None or pc.seq_pooling_type != "LAST":
            raise ValueError("fake vLLM: LAST pooling expected")
        if kw.get("enable_lora") and kw.get("max_lora_rank") not in _RANKS:
            raise ValueError(f"max_lora_rank must be one of {_RANKS}")
        from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

        self.task = kw["convert"]
        self.kw = kw
        if self.task == "embed":  # the decoder stack; vLLM names its modules model.layers.N... like LlamaForCausalLM
            self.model = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32).eval()
        self._loras: dict[int, tuple] = {}
        self.max_loras = kw.get("max_loras", 1)
        # tests of a crash mid-run: the engine with LoRA dies (process exit) after this many encode calls
        self._die_after = int(os.environ.get("FAKE_VLLM_DIE_AFTER", "0")) if kw.get("enable_lora") else 0
        self._calls = 0

    # -- LoRA, as vLLM reads it --------------------------------------------------------------------------------------
    def _lora(self, req) -> tuple:
        if req.lora_int_id in self._loras:
            return self._loras[req.lora_int_id]
        from safetensors.torch import load_file

        cfg = json.loads((Path(req.lora_path) / "adapter_config.json").read_text())
        if cfg.get("modules_to_save") and _ver() < (0, 31):
            raise ValueError("vLLM only supports modules_to_save being None.")
        if cfg["r"] > self.kw["max_lora_rank"]:
            raise ValueError(f"LoRA rank {cfg['r']} is greater than max_lora_rank {self.kw['max_lora_rank']}")
        tensors = load_file(Path(req.lora_path) / "adapter_model.safetensors")
        names = dict(self.model.named_modules())
        deltas, head = {}, None
        for key, t in tensors.items():
            name = key.removeprefix("base_model.model.")
            parts = name.split(".")
            if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
                module = ".".join(parts[:-2])
                if module not in names:
                    raise ValueError(f"While loading {req.lora_path}, expected target modules but received "
                                     f"{[module]}")
                deltas.setdefault(module, {})[parts[-2]] = t.float()
            elif cfg.get("modules_to_save") and parts[0] in cfg["modules_to_save"]:
                head = t.float()
            else:
                raise ValueError(f"{key} is unsupported LoRA weight")
        scale = cfg["lora_alpha"] / cfg["r"]
        if head is not None and head.shape[0] != self.model.config.num_labels:
            raise ValueError(f"adapter head has {head.shape[0]} labels, the base model {self.model.config.num_labels}")
        self._loras[req.lora_int_id] = ({m: scale * d["lora_B"] @ d["lora_A"] for m, d in deltas.items()}, head)
        return self._loras[req.lora_int_id]

    def _forward(self, ids: list[int], lora) -> torch.Tensor:
        deltas, head = self._lora(lora) if lora is not None else ({}, None)
        saved = {}
        with torch.no_grad():
            for m, d in deltas.items():
                lin = self.model.get_submodule(m)
                saved[m] = lin.weight.clone()
                lin.weight += d
            try:
                x = torch.tensor([ids])
                pos = torch.arange(len(ids))[None]
                if self.task == "embed":
                    return self.model.model(input_ids=x, position_ids=pos).last_hidden_state[0, -1]
                h = self.model.model(input_ids=x, position_ids=pos).last_hidden_state[0, -1]
                return h @ (head if head is not None else self.model.score.weight).T
            finally:
                for m, w in saved.items():
                    self.model.get_submodule(m).weight.copy_(w)

    def encode(self, prompts, pooling_params=None, *, use_tqdm=True, lora_request=None, pooling_task=None,
               tokenization_kwargs=None):
        self._calls += 1
        if self._die_after and self._calls > self._die_after:
            os._exit(7)
        if pooling_task != self.task:
            raise ValueError(f"Unsupported task: {pooling_task!r} Supported tasks: ({self.task!r},)")
        if pooling_params is None or pooling_params.use_activation is not False:
            raise ValueError("fake vLLM: the tests expect raw outputs (use_activation=False)")
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len({r.lora_int_id for r in loras if r is not None}) > self.max_loras:
            raise ValueError("more distinct LoRAs in one batch than max_loras")
        return [_Out(self._forward(p["prompt_token_ids"], r).float(), p["prompt_token_ids"])
                for p, r in zip(prompts, loras, strict=True)]
