"""GPU check of the read-token rule on the CUDA-graph path (fast_step): pad = eos, inputs that end in eos.

Run on the H200 by benchmarks/gpu/read_token.sh. Prints one JSON object:
- ``forward_graph_vs_eager`` / ``forward_graph_vs_alone``: max |logit difference| of a captured StaticForward against
  the eager ``classifier_logits`` and against each row read alone without padding (fp32: expect < 1e-5);
- ``forward_bf16_graph_vs_eager``: the same under bf16 autocast (expect bf16 rounding only, < 1e-2);
- ``train_graph_vs_eager_loss_rel``: relative difference of the summed loss of three captured training steps against
  the eager step (fp32: expect < 1e-5);
- ``run``: a short tiny-RTE run with ``train.fast_step=cuda_graph`` (step_mode, steps, test accuracy): it must finish.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy.config import load_config
from lorastudy.fast_step import StaticForward, StaticTrainStep
from lorastudy.training import HParams, Setup, make_optimizer, train_run, train_step


def tiny(dev: torch.device, tok):
    cfg = load_config(None)
    model, _ = M.load_base(cfg.model, 2, seed=3, tokenizer=tok)
    model = M.wrap_lora(model, 8, 16, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.to(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (graphs captured) or cpu (the same static code, eager)")
    ap.add_argument("--glue-dir", default=os.environ.get("LORASTUDY_GLUE_DIR", "../shared/data/glue"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    graphs = dev.type == "cuda"
    tok = M.tiny_tokenizer(append_eos=True)
    tok.pad_token = tok.eos_token
    texts = ["a short one", "a considerably longer sentence with more tokens", "mid length text"]
    rows = [tok(t)["input_ids"] for t in texts]
    assert all(r[-1] == tok.eos_token_id == tok.pad_token_id for r in rows)
    out: dict = {}
    model = tiny(dev, tok).eval()
    with torch.no_grad():
        alone = torch.cat([M.classifier_logits(model, {k: v.to(dev) for k, v in D.collate([r], 2).items()})
                           for r in rows])
        eager = M.classifier_logits(model, {k: v.to(dev) for k, v in D.collate(rows, 2).items()})
    graph = StaticForward(model, 4, None, dev, cuda_graph=graphs).logits(D.collate(rows, 2, pad_to=64)).clone()
    out["forward_graph_vs_eager"] = float((graph - eager).abs().max())
    out["forward_graph_vs_alone"] = float((graph - alone).abs().max())
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        eager16 = M.classifier_logits(model, {k: v.to(dev) for k, v in D.collate(rows, 2).items()}).float()
    g16 = StaticForward(model, 4, torch.bfloat16, dev, cuda_graph=graphs).logits(D.collate(rows, 2, pad_to=64))
    out["forward_bf16_graph_vs_eager"] = float((g16 - eager16).abs().max())

    hp = HParams(lr=5e-3, batch_size=4, epochs=1, warmup_ratio=0, weight_decay=0.01, lora_alpha=16, lora_dropout=0)
    ref, fast = tiny(dev, tok).train(), tiny(dev, tok).train()
    fast.load_state_dict(ref.state_dict())
    p_ref = [p for p in ref.parameters() if p.requires_grad]
    p_fast = [p for p in fast.parameters() if p.requires_grad]
    o_ref, o_fast = make_optimizer(ref, hp, dev), make_optimizer(fast, hp, dev, graphs=graphs)
    step = StaticTrainStep(fast, p_fast, o_fast, 4, 0.3, None, dev, cuda_graph=graphs)
    s_ref = Setup(ref, None, dev, None, 0, 0, p_ref)
    y = torch.tensor([0, 1, 1])
    losses = []
    for _ in range(3):
        b = {k: v.to(dev) for k, v in D.collate(rows, 2).items()}
        losses.append(float(train_step(s_ref, o_ref, None, b, y.to(dev), 0.3)))
        step.step(D.collate(rows, 2, pad_to=64), y)
    total, _ = step.take_loss()
    out["train_graph_vs_eager_loss_rel"] = abs(float(total) - sum(losses)) / abs(sum(losses))

    cfg = load_config("configs/tiny.yaml", [f"data.source={args.glue_dir}", "tasks=[rte]", f"train.device={dev}",
                                            f"train.fast_step={'cuda_graph' if graphs else 'static'}",
                                            "output_dir=/tmp/lorastudy/read_token"])
    m = train_run(cfg, "rte", "lora", 1, HParams.from_config(cfg, "lora", {"max_steps": 20}))
    out["run"] = {"step_mode": m["step_mode"], "steps": m["steps"], "test_accuracy": m["test"]["accuracy"],
                  "layout": m["inputs"]["layout"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
