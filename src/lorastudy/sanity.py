"""Phase 0 sanity check: each task x method must overfit a handful of training examples (loss < target).

A pipeline that cannot memorise 10 examples has a bug (labels, pooling, frozen head, learning rate), and every
later number would be meaningless."""

from __future__ import annotations

from lorastudy import data as D
from lorastudy import store
from lorastudy.training import HParams, build_model, make_optimizer, pick_device, seed_everything, to_device, train_step


def sanity_one(cfg, task: str, method: str, seed: int = 42, splits: D.Splits | None = None) -> dict:
    seed_everything(seed)
    spec = cfg.task(task)
    splits = splits or D.splits_for(cfg, task)
    df = D.subset(splits.train, cfg.sanity.n_examples, seed, f"{task}-sanity")
    hp = HParams.from_config(cfg, method, {"lr": cfg.sanity.lr[method], "lora_dropout": 0.0, "weight_decay": 0.0})
    device = pick_device(cfg.train.device)
    s = build_model(cfg, task, method, seed, hp, device)
    enc = D.encode(s.tokenizer, df, spec, cfg.data)
    batch = to_device(D.collate(enc.input_ids, s.tokenizer.pad_token_id, cfg.model.padding_side), device)
    import torch

    y = torch.tensor(enc.labels).to(device)
    opt = make_optimizer(s.model, hp, device)
    losses = []
    for step in range(1, cfg.sanity.max_steps + 1):  # noqa: B007 (step is reported)
        loss = float(train_step(s, opt, None, batch, y, cfg.train.max_grad_norm))  # tiny: a sync per step is fine
        losses.append(loss)
        if loss < cfg.sanity.target_loss:
            break
    return {"task": task, "method": method, "n_examples": len(enc), "steps": step, "final_loss": losses[-1],
            "passed": losses[-1] < cfg.sanity.target_loss, "target_loss": cfg.sanity.target_loss,
            "lr": hp.lr, "losses": losses}


def run_sanity(cfg, progress=None) -> list[dict]:
    path = cfg.out / "phase0" / "sanity.json"
    done = store.read_current(path, cfg)
    if done is not None:
        return done
    res = []
    for task in cfg.tasks:
        splits = D.splits_for(cfg, task)
        for method in cfg.methods:
            if progress is not None:
                progress.print(f"sanity {task}/{method} ...")
            res.append(sanity_one(cfg, task, method, splits=splits))
    store.write_current(path, cfg, res)
    return res
