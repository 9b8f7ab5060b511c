"""Model and adapter directories that vLLM can serve (files only; no vLLM needed).

vLLM 0.26-0.30 refuses a PEFT adapter whose ``adapter_config.json`` has ``modules_to_save`` (every lorastudy LoRA run
saves its trained ``score`` head that way). ``strip_head`` writes the adapter without its head: the LoRA tensors
unchanged (PEFT's ``base_model.model.model.layers.N...`` names, which vLLM maps onto its Llama modules after
dropping ``base_model.model.``), the head tensors removed and returned, and the config rewritten with
``modules_to_save: null`` and no task type (PEFT's sequence-classification task would wrap ``score`` again on
reload). vLLM then serves the backbone (``export_backbone``: the decoder stack as a ``LlamaModel`` checkpoint, run
as a pooling model that returns the last token's final hidden state) and each row's own head is applied outside.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorastudy import modeling as M

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_NOTE = "lorastudy_export.json"


class ExportError(ValueError):
    """An adapter directory that cannot be exported (names the file and what is wrong)."""


def save_adapters(base, adapters, targets: list[str], out_dir: Path) -> dict[str, Path]:
    """Each adapter saved by PEFT itself (its LoRA factors and its own ``score`` head via ``modules_to_save``), as a
    trained run saves it; returns {adapter name: directory}. For adapters that exist only in memory (synthetic)."""
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    paths = {}
    backbone = copy.deepcopy(M.backbone(base))  # one copy, reused: each adapter is unloaded from it after saving
    w = base.score.weight
    for ad in adapters:
        r = next(iter(ad.lora.values()))[0].shape[0]
        cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=ad.scaling * r, lora_dropout=0.0,
                         target_modules=list(targets), modules_to_save=["score"])
        with torch.device("meta"):  # only the head is new; the backbone is the copy above
            d = {k: v for k, v in base.config.to_dict().items() if k not in ("id2label", "label2id")}
            m = base.__class__(base.config.__class__.from_dict({**d, "num_labels": ad.num_labels}))
        m.model = backbone
        m.score = torch.nn.Linear(w.shape[1], ad.num_labels, bias=False, device=w.device, dtype=w.dtype)
        pm = get_peft_model(m, cfg)
        with torch.no_grad():
            for path, mod in pm.named_modules():
                if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                    a, b = ad.lora[path.split("base_model.model.", 1)[-1]]
                    mod.lora_A["default"].weight.copy_(a)
                    mod.lora_B["default"].weight.copy_(b)
                if path.endswith("score") and hasattr(mod, "modules_to_save"):
                    mod.modules_to_save["default"].weight.copy_(ad.score)
        paths[ad.name] = out_dir / ad.name
        pm.save_pretrained(paths[ad.name], safe_serialization=True)
        pm.unload()  # takes the LoRA layers out of the shared backbone again
    return paths


def _head_keys(tensors: dict, modules: list[str]) -> list[str]:
    """Keys of the saved ``modules_to_save`` modules (PEFT: ``base_model.model.<module>.<param>``)."""
    return [k for k in tensors if any(f".{m}." in f".{k}" and "lora_" not in k for m in modules)]


def strip_head(adapter_dir: Path, out_dir: Path) -> dict[str, torch.Tensor]:
    """Write ``adapter_dir`` without its ``modules_to_save`` head into ``out_dir`` (LoRA tensors unchanged, config
    with ``modules_to_save: null`` and ``task_type: null``); return the head's tensors by parameter name
    (``{"weight": [C, H]}`` and ``"bias"`` when present).

    Raises ``ExportError`` when the adapter has no head to strip, more than one saved module, or a missing file."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    cfg_path, w_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ExportError(f"{p}: missing (a PEFT adapter directory has {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = json.loads(cfg_path.read_text())
    modules = sorted(set(cfg.get("modules_to_save") or []))  # PEFT's SEQ_CLS lists "classifier" and "score"
    if not modules:
        raise ExportError(f"{cfg_path}: modules_to_save is empty: no head to strip")
    tensors = load_file(w_path)
    found = [m for m in modules if _head_keys(tensors, [m])]
    if len(found) != 1:
        raise ExportError(f"{w_path}: expected the tensors of exactly one saved head module among {modules}, "
                          f"found {found}")
    head_keys = _head_keys(tensors, found)
    head = {k.rsplit(".", 1)[-1]: tensors.pop(k) for k in head_keys}
    if "weight" not in head or head["weight"].ndim != 2:
        raise ExportError(f"{w_path}: the saved {found[0]!r} has no 2-D weight ({sorted(head)})")
    if not any(".lora_A." in k for k in tensors):
        raise ExportError(f"{w_path}: no LoRA tensors left after removing the head")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / ADAPTER_WEIGHTS)
    cfg.update(modules_to_save=None, task_type=None)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out_dir / EXPORT_NOTE).write_text(json.dumps({"from": str(adapter_dir), "head_removed": found[0],
                                                   "head_keys": head_keys}, indent=2))
    return head


def id_tokenizer(vocab_size: int):
    """A tokenizer whose vocabulary is the ids 0..vocab_size-1 (token ``<i>`` = id i), built in code.

    Why: vLLM's pooling entry points need a tokenizer in the model directory (``skip_tokenizer_init`` is refused
    there, vLLM 0.26) and check prompt ids against its vocabulary, while every engine here is given token ids, never
    text; this one accepts any id the model's embedding has, whatever tokenizer made them."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<0>", pad_token="<0>")


def _save_tokenizer(model, out_dir: Path) -> None:
    id_tokenizer(int(model.config.vocab_size)).save_pretrained(out_dir)


def export_backbone(base, out_dir: Path) -> Path:
    """The classifier's decoder stack (no head) as a ``LlamaModel``-style checkpoint (HF ``save_pretrained``), with
    an id tokenizer (``id_tokenizer``)."""
    out_dir = Path(out_dir)
    M.backbone(base).save_pretrained(out_dir, safe_serialization=True)
    _save_tokenizer(base, out_dir)
    return out_dir


def export_classifier(model, out_dir: Path, num_labels: int | None = None) -> Path:
    """A plain sequence classifier (e.g. a merged model) as saved by HF ``save_pretrained``; with ``num_labels``
    different from the model's, a copy with an untrained zero head of that size (the base that vLLM >= 0.31 puts
    each adapter's saved head on). An id tokenizer is saved beside (``id_tokenizer``)."""
    out_dir = Path(out_dir)
    if num_labels is not None and num_labels != model.config.num_labels:
        w = model.score.weight
        model = copy.deepcopy(model)
        model.score = torch.nn.Linear(w.shape[1], num_labels, bias=False, device=w.device, dtype=w.dtype)
        torch.nn.init.zeros_(model.score.weight)
        model.config.num_labels = num_labels
    model.save_pretrained(out_dir, safe_serialization=True)
    _save_tokenizer(model, out_dir)
    return out_dir


def copy_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """An adapter as saved (vLLM >= 0.31 serves its head): its two files copied."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(Path(adapter_dir) / name, out_dir / name)
    return out_dir
