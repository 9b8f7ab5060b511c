"""Results layout, atomic writes, completion markers, manifest, code version.

Partial work never looks finished: files are written to a temporary name and renamed; a run directory is built
under a temporary name, gets its ``COMPLETE`` marker last and is then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lorastudy import __version__

COMPLETE = "COMPLETE"
FAILED = "FAILED.json"


class StoreError(RuntimeError):
    pass


def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; read once (os.umask is process-wide, not thread-safe)


def publish(tmp: str | Path, path: Path) -> None:
    """Give a finished temp file the usual permissions (mkstemp makes it owner-only: shared results dirs would be
    unreadable to others) and rename it onto ``path`` in one step."""
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: a crash or a full disk leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_default, allow_nan=True) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: corrupted JSON ({e}); delete it to recompute") from e


def read_current(path: Path, cfg) -> Any | None:
    """The ``results`` of a phase file written by ``write_current`` for this config, else None (recompute)."""
    if Path(path).is_file():
        done = read_json(path)
        if done.get("config_hash") == cfg.hash():
            return done["results"]
    return None


def write_current(path: Path, cfg, results: Any) -> None:
    atomic_write_json(path, {"config_hash": cfg.hash(), "results": results})


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; on success mark it COMPLETE and rename it to ``final``.
    On failure the temporary directory is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        (tmp / COMPLETE).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_partials(root: Path) -> int:
    """Remove leftovers of killed runs (``.*.partial`` dirs, ``.*.tmp`` files)."""
    n = 0
    root = Path(root)
    if not root.exists():
        return 0
    for p in list(root.rglob(".*.partial")) + list(root.rglob(".*.tmp")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        n += 1
    return n


def code_version() -> dict[str, str]:
    here = Path(__file__).resolve().parent
    info = {"package": __version__}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            info["git_commit"] = sha.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5)
            info["git_dirty"] = str(bool(dirty.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# -- layout ----------------------------------------------------------------------------------------------------------
def run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return Path(out) / "phase2" / task / method / f"seed{seed}"


def rep_dir(out: Path, task: str, method: str | None = None, seed: int | None = None) -> Path:
    if method is None:
        return Path(out) / "phase3" / task / "base"
    return Path(out) / "phase3" / task / method / f"seed{seed}"


def check_manifest(cfg, force: bool = False) -> None:
    """Refuse to mix results of different configs in one directory (unless ``force``). The manifest records the
    config hash (which covers the data by content) and, under ``"data"``, ``data.data_identity(cfg)``: per task the
    files with their sha256, the rows per split, rows kept out of validation as copies, split overlaps."""
    out = cfg.out
    man = out / "manifest.json"
    if man.is_file():
        old = read_json(man)
        if old.get("config_hash") != cfg.hash() and not force:
            raise StoreError(
                f"{out} holds results of a different config (hash {old.get('config_hash')} != {cfg.hash()}); "
                "use another output_dir, or --force to reuse it (finished units will be recomputed only where "
                "their own recorded config differs)"
            )
    from lorastudy.config import dump_yaml
    from lorastudy.data import data_identity

    atomic_write_json(man, {"config_hash": cfg.hash(), "name": cfg.name, "code": code_version(),
                            "data": data_identity(cfg)})
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
