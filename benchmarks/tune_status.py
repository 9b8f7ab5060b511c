"""Every trial of a config's phase-1 studies as JSON (state, value, params, timings), read from the Optuna storage:
the record of a tuning run, complete or not.

    python benchmarks/tune_status.py configs/smollm2.yaml --set output_dir=/tmp/lorastudy/results --out trials.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from lorastudy import tuning
from lorastudy.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    cfg = load_config(a.config, a.sets)
    rows = []
    for t in cfg.tasks:
        for m in cfg.methods:
            for tr in tuning.get_study(cfg, t, m).get_trials(deepcopy=False):
                rows.append({"task": t, "method": m, **tuning.trial_record(tr)})  # every trial, surplus included
    a.out.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    for (t, m, st), n in sorted(Counter((r["task"], r["method"], r["state"]) for r in rows).items()):
        print(f"{t}/{m} {st}: {n}")


if __name__ == "__main__":
    main()
