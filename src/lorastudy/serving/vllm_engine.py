"""The ``vllm`` engine: vLLM's offline ``LLM`` on a pooling model, behind the engines' interface
(``engine(batch, adapter_idx) -> [B, C]`` logits, ``-inf`` past a row's label count; ``heads``).

Runs inside a worker process (``vllm_worker``; one vLLM engine per process). Three configurations (``spec["mode"]``):

- ``merged``: one merged classifier (LoRA folded in, its own ``score`` head), served by vLLM's classify pooler
  (``LAST`` pooling, no activation: raw logits). The merged-in-vLLM baseline.
- ``adapters`` with ``heads: "outside"`` (vLLM 0.26-0.30, which refuses adapters with ``modules_to_save``): the base's
  decoder stack served as an embedding model (``convert="embed"``, ``LAST`` pooling, no normalisation: the last
  token's final hidden state) with each row's LoRA adapter, exported without its head, as a ``LoRARequest``; each
  row's own ``score`` head applied outside vLLM as one gathered matmul (``heads.StackedHeads``).
- ``adapters`` with ``heads: "vllm"`` (vLLM >= 0.31, every head with the base's label count): the base classifier with
  the adapters as saved; vLLM serves each adapter's head.

A call is one ``LLM.encode`` on token-id prompts (no tokenizer; pads removed by the attention mask, so vLLM reads the
same last real token as the other engines): vLLM's scheduler, input preparation, the forward, pooling and the copy
of the pooled rows to the host, plus, for ``outside`` heads, the head matmul. Prefix caching is off: every call
recomputes every token, as the other engines do.
"""

from __future__ import annotations

import torch

from lorastudy.serving.heads import StackedHeads, pad_logits

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values (LoRAConfig)


def max_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds rank ``r``."""
    for x in LORA_RANKS:
        if x >= r:
            return x
    raise ValueError(f"LoRA rank {r} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}")


def token_lists(batch: dict) -> list[list[int]]:
    """Each row's real tokens (attention mask 1), in order: what vLLM is given instead of a padded batch."""
    ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    return [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]


class VllmEngine:
    """vLLM behind the engines' interface. ``spec`` keys: ``mode`` ("merged" | "adapters"), ``heads``
    ("outside" | "vllm"; adapters only), ``model_dir``, ``adapters`` (list of {"name", "path", "num_labels"}),
    ``heads_file`` (safetensors with ``head_<i>``, for outside heads), ``num_labels`` (merged), ``dtype``,
    ``cuda_graphs``, ``capture_tokens`` (tokens per step of the timed batches: their CUDA graphs), ``max_lora_rank``,
    ``max_model_len``, ``max_num_seqs``, ``kv_cache_bytes``, ``gpu_memory_utilization``."""

    name = "vllm"

    def __init__(self, spec: dict):
        from vllm import LLM, PoolingParams
        from vllm.config import PoolerConfig
        from vllm.lora.request import LoRARequest

        self.spec = spec
        self.mode, self.heads_where = spec["mode"], spec.get("heads", "vllm")
        adapters = spec.get("adapters", [])
        lora = {}
        if self.mode == "adapters":
            lora = dict(enable_lora=True, max_loras=len(adapters), max_cpu_loras=len(adapters),
                        max_lora_rank=int(spec["max_lora_rank"]))
        self.task = "embed" if self.mode == "adapters" and self.heads_where == "outside" else "classify"
        seqs, length = int(spec["max_num_seqs"]), int(spec["max_model_len"])
        graphs = {}
        if spec["cuda_graphs"] and spec.get("capture_tokens"):
            # graphs for exactly the timed batch shapes (tokens per step), as the other engines have: vLLM's default
            # captures steps of at most 2 x max_num_seqs tokens, which no 64-token prompt batch fits
            sizes = sorted(int(t) for t in spec["capture_tokens"])
            graphs["compilation_config"] = {"cudagraph_capture_sizes": sizes, "max_cudagraph_capture_size": sizes[-1]}
        self.llm = LLM(
            model=spec["model_dir"], runner="pooling", convert=self.task, dtype=spec["dtype"],
            pooler_config=PoolerConfig(seq_pooling_type="LAST", use_activation=False),
            enforce_eager=not spec["cuda_graphs"], enable_prefix_caching=False,
            max_model_len=length, max_num_seqs=seqs, max_num_batched_tokens=seqs * length,
            kv_cache_memory_bytes=int(spec["kv_cache_bytes"]),
            gpu_memory_utilization=float(spec["gpu_memory_utilization"]), seed=0, **graphs, **lora)
        self.params = PoolingParams  # a fresh one per call: vLLM writes into the params it is given
        self.requests = [LoRARequest(a["name"], i + 1, a["path"]) for i, a in enumerate(adapters)]
        self.label_counts = [int(a["num_labels"]) for a in adapters] or [int(spec["num_labels"])]
        self.num_labels = max(self.label_counts)
        self.heads = None
        if self.task == "embed":
            from safetensors.torch import load_file

            t = load_file(spec["heads_file"])
            self.heads = StackedHeads([t[f"head_{i}"] for i in range(len(adapters))], dtype=torch.float32)

    def prepare(self, rows: list[list[int]], adapter_idx: list[int]) -> tuple:
        """The arguments of one call, built before timing (prompts, LoRA requests, index tensor)."""
        from vllm import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r) for r in rows]
        loras = [self.requests[i] for i in adapter_idx] if self.requests else None
        return prompts, loras, torch.as_tensor(adapter_idx, dtype=torch.long)

    def run(self, prepared: tuple) -> torch.Tensor:
        """One call: ``[B, C_max]`` float32 logits on the host."""
        prompts, loras, idx = prepared
        outs = self.llm.encode([dict(p) for p in prompts], pooling_params=self.params(use_activation=False),
                               lora_request=loras, pooling_task=self.task, use_tqdm=False)
        pooled = [o.outputs.data for o in outs]
        if self.heads is not None:
            return self.heads(torch.stack(pooled).float().cpu(), idx)
        # classify: each row's own logits (a merged model has one head; vLLM heads have the base's label count)
        return torch.stack([pad_logits(p.float().cpu()[None], self.num_labels)[0] for p in pooled])

    def __call__(self, batch: dict, adapter_idx: torch.Tensor, present=None) -> torch.Tensor:
        return self.run(self.prepare(token_lists(batch), adapter_idx.tolist()))
