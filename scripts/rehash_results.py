"""Migrate results directories to the config hash without the execution keys (config.EXECUTION_KEYS).

Why: until this change the config hash covered how runs are executed (``train.fast_step``, ``fuse``,
``fuse_max_runs``, ``step_levers``, the compile options); it now leaves them out, so that a study may run its
phase 2 with a step lever its phase 1 ran without. A results directory written before the change records the old
hash in its manifest, phase files, run summary, serving results and model cards, and ``lorastudy run`` would refuse
it ("holds results of a different config"). This script rewrites those records, and only those: for each
directory it computes the old hash of the recorded config (config.yaml), checks that the manifest holds it, and
replaces it by the new one in every ``*.json`` and ``*.md`` file below the directory (the manifest last), refreshing
the COMPLETE markers that list a rewritten file (model cards, checkpoint identities); a merged directory's shard
records (``manifest.json`` "shards", ``MERGED.json``) get their shards' new hashes (the recorded config with the
shard's tasks). A directory already migrated is left alone; one whose migration was interrupted is finished. The
report's HTML keeps the old hash: regenerate it (``lorastudy report DIR``).

    python scripts/rehash_results.py RESULTS_DIR [RESULTS_DIR ...] [--data-dir GLUE] [--dry-run]

Exit 0 when every directory is migrated or already current; 2 (naming the directory and the file) when a
directory is not a results dir, its manifest holds neither hash, or its data cannot be read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from lorastudy import store
from lorastudy.config import ConfigError, StudyConfig
from lorastudy.data import DataError


def legacy_hash(cfg: StudyConfig) -> str:
    """The config hash as computed before the execution keys left it: of ``train`` only ``checkpoint_every_min``
    was left out."""
    return cfg.hash(leave_out=("train.checkpoint_every_min",))


def hash_map(cfg: StudyConfig, shard_tasks: list[list[str]]) -> dict[str, str]:
    """Old hash -> new hash for the config and for each shard's task subset of it (merged directories)."""
    out = {}
    for tasks in [cfg.tasks, *shard_tasks]:
        c = cfg.model_copy(update={"tasks": list(tasks)})
        old, new = legacy_hash(c), c.hash()
        if old != new:
            out[old] = new
    return out


def _repair_markers(out: Path, mapping: dict[str, str], dry_run: bool) -> list[Path]:
    """COMPLETE markers whose entry for a JSON / Markdown file lists the file's content before its rewrite (a model
    card, a checkpoint's identity.json; also after a pass stopped before this step): refreshed, else the unit would
    no longer count as complete (store.is_complete checks checksums) and would be recomputed or refused. The
    rewrite keeps sizes (a 12-character hash for another). Returns the markers changed."""
    fixed = []
    for marker in sorted(out.rglob(store.COMPLETE)):
        try:
            doc = json.loads(marker.read_text())
            files = doc["files"]
        except (json.JSONDecodeError, OSError, KeyError, TypeError):
            continue
        changed = False
        for rel, entry in files.items():
            p = marker.parent / rel
            if not (isinstance(entry, dict) and "sha256" in entry and p.suffix in (".json", ".md") and p.is_file()):
                continue
            raw = p.read_bytes()
            if hashlib.sha256(raw).hexdigest() == entry["sha256"]:
                continue
            before = raw.decode(errors="replace")
            for a, b in mapping.items():
                before = before.replace(b, a)
            if hashlib.sha256(before.encode()).hexdigest() == entry["sha256"]:
                entry["size"], entry["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
                changed = True
        if changed:
            fixed.append(marker)
            if not dry_run:
                store.atomic_write_json(marker, doc)
    return fixed


def migrate(out: Path, data_dir: str | None, dry_run: bool = False) -> list[Path]:
    """Rewrite the old hash of results dir ``out`` to the new one; returns the files changed. The manifest is
    written last, so an interrupted migration is finished by running it again. Raises store.StoreError (not a
    results dir, manifest with another hash), ConfigError or DataError."""
    from lorastudy.report.build import recorded_config

    out = Path(out)
    cfg = recorded_config(out)
    if data_dir:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": data_dir})})
    man_path = out / "manifest.json"
    man = store.read_json(man_path) if man_path.is_file() else {}
    have, old = man.get("config_hash"), legacy_hash(cfg)
    if have not in (old, cfg.hash()):
        raise store.StoreError(f"config_hash {have!r} in manifest.json is neither the recorded config's old hash "
                               f"({old}) nor its new one ({cfg.hash()}): not migrated")
    shard_tasks = [s.get("tasks") or [] for s in man.get("shards") or [] if isinstance(s, dict)]
    mapping = hash_map(cfg, shard_tasks)
    changed = []
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".md")
                   and p.name != store.COMPLETE and p != man_path)
    for path in [*files, man_path]:
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        new = text
        for a, b in mapping.items():
            new = new.replace(a, b)
        if new != text:
            changed.append(path)
            if not dry_run:
                store.atomic_write_text(path, new)
    return changed + _repair_markers(out, mapping, dry_run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--data-dir", help="where the GLUE files are, if not where the recorded config says")
    ap.add_argument("--dry-run", action="store_true", help="list the files that would change")
    a = ap.parse_args(argv)
    rc = 0
    for d in a.dirs:
        try:
            changed = migrate(d, a.data_dir, a.dry_run)
        except (store.StoreError, ConfigError, DataError) as e:
            msg = str(e)
            print(f"error: {msg if msg.startswith(str(d)) else f'{d}: {msg}'}", file=sys.stderr)
            rc = 2
            continue
        print(f"{d}: {'already on the new hash' if not changed else f'{len(changed)} file(s) rewritten'}"
              + (" (dry run)" if a.dry_run and changed else "")
              + (f"; regenerate its report: lorastudy report {d}" if changed and not a.dry_run
                 and (d / "ANALYSIS_REPORT.md").is_file() else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
