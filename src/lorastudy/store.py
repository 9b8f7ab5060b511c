"""Results layout, atomic writes, completion markers, manifest, code version.

Partial work never looks finished: files are written to a temporary name and renamed; a run directory is built
under a temporary name, gets its ``COMPLETE`` marker last and is then renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lorastudy import __version__

COMPLETE = "COMPLETE"
FAILED = "FAILED.json"
# a serving part's per-batch-size checkpoints, under its deployment dir (serving.benchmark): unfinished work
SERVING_PARTIAL = "partial"


class StoreError(RuntimeError):
    """The results dir cannot be used: a corrupted artifact, another config's results, a lock held by another
    process, or a write that failed (read-only, disk full); the message names the path and the cause (exit 2)."""


def write_error(path: Path | str, e: OSError) -> StoreError:
    """A StoreError naming ``path`` and the cause of a failed write, with what to do about the usual causes."""
    cause = e.strerror or str(e)
    hint = {errno.ENOSPC: "free disk space (or choose another output_dir), then rerun: finished work is kept",
            errno.EDQUOT: "free space within your quota (or choose another output_dir), then rerun",
            errno.EROFS: "the file system is read-only: choose a writable output_dir",
            errno.EACCES: "no permission to write there: fix the permissions or choose another output_dir",
            errno.EPERM: "no permission to write there: fix the permissions or choose another output_dir",
            }.get(e.errno, "check the path, then rerun: finished work is kept")
    return StoreError(f"cannot write {path}: {cause} [errno {e.errno}]; {hint}")


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
_DIR_MODE = 0o777 & ~_umask()  # what mkdir() would give


def publish(tmp: str | Path, path: Path) -> None:
    """Give a finished temp file the usual permissions (mkstemp makes it owner-only: shared results dirs would be
    unreadable to others) and rename it onto ``path`` in one step."""
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: a crash or a full disk leaves the old file.

    A failed write (read-only dir, disk full, no permission) raises StoreError naming ``path`` and the cause."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from e
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


# Files up to this size are checksummed in the COMPLETE marker (metrics, configs: a corruption that keeps the size
# must be seen); larger ones (weights) are checked by size, which a truncated copy fails, without reading them.
CHECKSUM_MAX_BYTES = 4 << 20


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _inventory(root: Path) -> dict[str, dict]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != COMPLETE:
            size = p.stat().st_size
            files[str(p.relative_to(root))] = {"size": size, **({"sha256": _sha256(p)} if size <= CHECKSUM_MAX_BYTES
                                                                 else {})}
    return files


def is_complete(path: Path, skip: tuple[str, ...] = ()) -> bool:
    """Whether the unit directory ``path`` is finished and intact: its COMPLETE marker exists and every artifact it
    lists is there with its recorded size (and checksum, for small files). A unit with a missing or corrupted
    artifact is not complete, so it is recomputed (deleting a corrupted file, as error messages advise, works).
    Markers written before artifacts were listed (``ok``) count when every JSON file of the unit parses.
    ``skip``: prefixes of listed files not required (e.g. ``("model/",)``: a task shard copied without full
    fine-tuned weights, ``lorastudy.merge``)."""
    path = Path(path)
    try:
        text = (path / COMPLETE).read_text()
    except OSError:
        return False
    try:
        files = json.loads(text)["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        try:
            for p in path.glob("*.json"):
                json.loads(p.read_text())
        except (OSError, ValueError):
            return False
        return text.strip() == "ok"
    for rel, want in files.items():
        if skip and rel.startswith(skip):
            continue
        p = path / rel
        try:
            if p.stat().st_size != want["size"] or ("sha256" in want and _sha256(p) != want["sha256"]):
                return False
        except OSError:
            return False
    return True


def check_not_damaged(path: Path, how: str, skip: tuple[str, ...] = ()) -> bool:
    """Whether the unit ``path`` is complete (``is_complete``, checked once); StoreError when it has its COMPLETE
    marker but a missing or corrupted artifact (so it is not complete): readers must not skip it silently; ``how``
    says which command recomputes it. ``skip``: as for ``is_complete``."""
    path = Path(path)
    complete = is_complete(path, skip)
    if not complete and (path / COMPLETE).is_file():
        raise StoreError(f"{path}: an artifact is missing or corrupted (it does not match the COMPLETE marker's "
                         f"list); {how} recomputes this unit")
    return complete


def _publish_tree(root: Path) -> None:
    """Give a finished tree the usual permissions (mkdtemp makes directories owner-only, and safetensors writes
    weights -rw------- whatever the umask: a shared results dir would be unreadable to colleagues)."""
    os.chmod(root, _DIR_MODE)
    for p in root.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, _DIR_MODE if p.is_dir() else _FILE_MODE)


@contextmanager
def staging_dir(final: Path, marker: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; on success list its artifacts in a COMPLETE marker (unless
    ``marker`` is False) and rename it to ``final``. On failure the temporary directory is removed and ``final`` is
    untouched. A failed write (disk full, read-only, no permission) inside or while finishing raises StoreError
    naming ``final``."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    except OSError as e:
        raise write_error(final, e) from e
    try:
        yield tmp
        if marker:
            inv = {"files": _inventory(tmp), "finished": datetime.datetime.now().isoformat(timespec="seconds")}
            (tmp / COMPLETE).write_text(json.dumps(inv, indent=1) + "\n")
        _publish_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG):
            raise write_error(final, e) from e
        raise
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


def failed_marker(rd: Path) -> Path:
    """A run dir's failure record, ``seed<k>.FAILED.json`` beside it (never inside: a failed run never looks
    complete)."""
    rd = Path(rd)
    return rd.parent / f"{rd.name}.{FAILED}"


def rep_dir(out: Path, task: str, method: str | None = None, seed: int | None = None) -> Path:
    if method is None:
        return Path(out) / "phase3" / task / "base"
    return Path(out) / "phase3" / task / method / f"seed{seed}"


def check_manifest(cfg, force: bool = False) -> None:
    """Refuse to mix results of different configs in one directory (unless ``force``). The manifest records the
    config hash (which covers the data by content) and, under ``"data"``, ``data.data_identity(cfg)``: per task the
    files with their sha256, the rows per split, rows kept out of validation as copies, split overlaps; a dir merged
    from task shards also keeps ``"shards"`` (``lorastudy.merge``: each shard's dir name, config hash, code version,
    tasks)."""
    out = cfg.out
    man = out / "manifest.json"
    kept = {}
    if man.is_file():
        old = read_json(man)
        if old.get("config_hash") != cfg.hash() and not force:
            raise StoreError(
                f"{out} holds results of a different config (hash {old.get('config_hash')} != {cfg.hash()}); "
                "use another output_dir, or --force to reuse it (finished units will be recomputed only where "
                "their own recorded config differs); a dir written before the hash left out the execution keys "
                "(train.fast_step, fuse, step_levers, ...) is migrated by `python scripts/rehash_results.py DIR`"
            )
        if old.get("config_hash") == cfg.hash() and "shards" in old:
            kept["shards"] = old["shards"]  # a dir merged from task shards (lorastudy.merge) keeps their record
    from lorastudy.config import dump_yaml
    from lorastudy.data import data_identity

    atomic_write_json(man, {"config_hash": cfg.hash(), "name": cfg.name, "code": code_version(),
                            "data": data_identity(cfg), **kept})
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))


# -- one process per results dir -----------------------------------------------------------------------------------
LOCK = ".lock"


def _holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return "a process that has not written its name yet"
    return f"host {h.get('host')}, pid {h.get('pid')}, since {h.get('since')}, command: {h.get('command')}"


@contextmanager
def results_lock(out: Path, command: str | None = None) -> Iterator[None]:
    """Hold the results dir ``out`` for this process (``lorastudy run``, ``train-all``): a second process on the
    same dir gets a StoreError naming the holder (host, pid, command, since) instead of doing all work twice.

    Written with fcntl.flock rather than a lock library: the holder's identity lives in the lock file itself, which
    the refused process reads (a library's lock file is truncated by every attempt), and the kernel releases the
    lock when the holder dies, even by SIGKILL, so there are no stale locks. POSIX only (fcntl); on NFS, Linux
    emulates flock with byte-range locks, which the server arbitrates across machines."""
    import fcntl  # POSIX; imported here so that the rest of this module works elsewhere

    out = Path(out)
    path = out / LOCK
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{out} is in use by another lorastudy process ({_holder(fd)}); wait for it to finish "
                             "or stop it (two processes on one results dir would do every unit twice)") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "command": command or shlex.join(sys.argv),
                "since": datetime.datetime.now().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as e:
            raise write_error(path, e) from e
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # released: the next holder writes its own name
    finally:
        os.close(fd)  # releases the lock
