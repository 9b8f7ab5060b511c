"""Build the serving engines from a list of adapters (phase-2 LoRA runs, or synthetic ones on random models)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from lorastudy import modeling as M
from lorastudy.serving.engines import Adapter, BatchedLoraEngine, MergedEngine, PeftEngine, adapter_from_peft
from lorastudy.serving.heads import NO_CLASS

# Architecture-only configs (random weights): timing needs the shapes, not the knowledge.
SYNTHETIC_ARCHS = {
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192),
}


def synthetic_base(arch: str, num_labels: int = 2, seed: int = 0, device="cpu") -> LlamaForSequenceClassification:
    """Random weights of a real architecture; built directly on ``device`` (a 1.1B init on CPU takes long)."""
    cfg = LlamaConfig(**SYNTHETIC_ARCHS[arch], num_labels=num_labels, pad_token_id=2, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            return LlamaForSequenceClassification(cfg)


def synthetic_adapters(base, n: int, rank: int = 8, alpha: float = 16, targets=("q_proj", "v_proj"),
                       num_labels: int | dict[str, int] = 2, seed: int = 0,
                       tasks: list[str] | None = None) -> list[Adapter]:
    """Random adapters with non-zero B (a fresh PEFT adapter has B = 0, which would hide routing bugs).
    ``num_labels``: one count for every adapter, or a count per task name (adapter i serves ``tasks[i % len]``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    keys = [p for p, m in base.named_modules() if p.split(".")[-1] in targets and isinstance(m, torch.nn.Linear)]
    for i in range(n):
        lora = {}
        for k in keys:
            lin = base.get_submodule(k)
            a = torch.randn(rank, lin.in_features, generator=g) / lin.in_features ** 0.5
            b = torch.randn(lin.out_features, rank, generator=g) * 0.02
            lora[k] = (a, b)
        task = tasks[i % len(tasks)] if tasks else f"task{i}"
        c = num_labels[task] if isinstance(num_labels, dict) else num_labels
        score = torch.randn(c, base.config.hidden_size, generator=g) * 0.05
        out.append(Adapter(f"a{i}", task, c, lora, alpha / rank, score))
    return out


def merged_model(base, ad: Adapter):
    """A plain classifier with the LoRA update folded in (W += scale * B A) and the adapter's head."""
    m = copy.deepcopy(base)
    with torch.no_grad():
        for key, (a, b) in ad.lora.items():
            lin = m.get_submodule(key)
            lin.weight += (ad.scaling * (b.double() @ a.double())).to(lin.weight.device, lin.weight.dtype)
        old = m.score.weight
        m.score = torch.nn.Linear(m.config.hidden_size, ad.num_labels, bias=False).to(old.device, old.dtype)
        m.score.weight.copy_(ad.score)
    m.config.num_labels = ad.num_labels
    return m.eval()


def peft_model(base, adapters: list[Adapter], targets: list[str]):
    """One PEFT model holding every adapter (LoRA factors and score head copied in).

    Label counts that differ between adapters: each adapter's saved head becomes a ``Linear(H, C_max)`` whose first
    ``C_task`` rows are the trained head and whose bias is 0 there and ``-inf`` beyond (``heads``); PEFT's mixed
    batch stacks the heads' outputs, which needs one width."""
    from peft import LoraConfig, get_peft_model

    def conf(ad: Adapter):
        r = next(iter(ad.lora.values()))[0].shape[0]
        return LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=ad.scaling * r, lora_dropout=0.0,
                          target_modules=list(targets), modules_to_save=["score"])

    c_max = max(ad.num_labels for ad in adapters)
    pm = get_peft_model(copy.deepcopy(base), conf(adapters[0]), adapter_name=adapters[0].name)
    for ad in adapters[1:]:
        pm.add_adapter(ad.name, conf(ad))
    with torch.no_grad():
        for path, mod in pm.named_modules():
            if hasattr(mod, "lora_A"):
                key = path.split("base_model.model.", 1)[-1]
                for ad in adapters:
                    a, b = ad.lora[key]
                    mod.lora_A[ad.name].weight.copy_(a)
                    mod.lora_B[ad.name].weight.copy_(b)
            if path.endswith("score") and hasattr(mod, "modules_to_save"):
                for ad in adapters:
                    _set_head(mod.modules_to_save, ad, c_max)
    return pm.eval()


def _set_head(heads: torch.nn.ModuleDict, ad: Adapter, c_max: int) -> None:
    """The adapter's trained head into PEFT's ``modules_to_save`` copy (padded to ``c_max`` classes, see
    ``peft_model``)."""
    old = heads[ad.name].weight
    if old.shape[0] == ad.num_labels == c_max:
        old.copy_(ad.score)
        return
    lin = torch.nn.Linear(old.shape[1], c_max, bias=c_max != ad.num_labels).to(old.device, old.dtype)
    lin.weight.zero_()
    lin.weight[: ad.num_labels].copy_(ad.score)
    if lin.bias is not None:
        lin.bias.zero_()
        lin.bias[ad.num_labels:] = NO_CLASS
    lin.requires_grad_(False)
    heads[ad.name] = lin


def build_engines(base, adapters: list[Adapter], targets: list[str], names: list[str], device, dtype,
                  fuse: bool = True) -> dict:
    """The named engines on ``device`` in ``dtype``; ``fuse``: start ``merged`` and ``batched`` on their fused
    serving path (``set_fused`` switches later)."""
    engines = {}
    base = base.to(dtype=dtype).eval()
    if "merged" in names:
        engines["merged"] = MergedEngine([merged_model(base, a).to(device) for a in adapters], fuse=fuse)
    if "peft" in names:
        engines["peft"] = PeftEngine(peft_model(base, adapters, targets).to(device), [a.name for a in adapters],
                                     [a.num_labels for a in adapters])
    if "batched" in names:
        engines["batched"] = BatchedLoraEngine(copy.deepcopy(base).to(device), adapters, fuse=fuse).eval()
    return engines


def complete_lora_runs(cfg) -> list[tuple[str, str, Path]]:
    """(adapter name, task, run dir) of the study's complete phase-2 LoRA runs, seed-major with the tasks
    interleaved (so the first k adapters cover as many tasks as possible). A run dir may lack its ``adapter/``
    (an exported dir leaves adapters out)."""
    from lorastudy import store

    return [(f"{task}-s{seed}", task, rd) for seed in cfg.seeds for task in cfg.tasks
            if store.is_complete(rd := store.run_dir(cfg.out, task, "lora", seed))]


def study_adapters(cfg, tokenizer) -> tuple[object, list[Adapter]]:
    """The base model and every complete phase-2 LoRA run of the study that has its adapter, as adapters (tasks x
    seeds, in ``complete_lora_runs``'s order)."""
    adapters = []
    base = None
    for name, task, rd in complete_lora_runs(cfg):
        if not (rd / "adapter").exists():
            continue
        pm, _ = M.load_trained(cfg.model, cfg.task(task).num_labels, rd / "adapter", "lora", tokenizer=tokenizer)
        adapters.append(adapter_from_peft(pm, name, task))
        adapters[-1].path = rd / "adapter"
        if base is None:
            base, _ = M.load_base(cfg.model, cfg.task(task).num_labels, seed=0, tokenizer=tokenizer)
    return base, adapters
