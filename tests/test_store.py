"""Operational faults of the results dir (issue 14 item 10): completion that checks the artifacts, the usual
permissions, clear errors for read-only dirs and full disks, one process per results dir."""

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lorastudy import store
from lorastudy.cli import app
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def _unit(tmp_path):
    final = tmp_path / "phase2" / "rte" / "lora" / "seed1"
    with store.staging_dir(final) as tmp:
        store.atomic_write_json(tmp / "metrics.json", {"test": {"accuracy": 0.5}})
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "weights.bin").write_bytes(b"w" * (store.CHECKSUM_MAX_BYTES + 10))
    return final


def test_completion_checks_the_artifacts_not_only_the_marker(tmp_path):
    """Was: a corrupted metrics.json was reported with the advice "delete it to recompute"; deleting it left the
    unit marked complete, never retrained, and the study unfinishable."""
    final = _unit(tmp_path)
    assert store.is_complete(final)
    m = final / "metrics.json"
    good = m.read_bytes()
    m.write_bytes(good.replace(b"0.5", b"0.9"))  # same size, other content
    assert not store.is_complete(final)
    m.write_bytes(good)
    assert store.is_complete(final)
    m.unlink()  # what the error message advises
    assert not store.is_complete(final)
    m.write_bytes(good)
    w = final / "adapter" / "weights.bin"
    w.write_bytes(w.read_bytes()[:-1])  # a truncated weights file (large: checked by size)
    assert not store.is_complete(final)


def test_legacy_marker_counts_only_with_readable_json(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / store.COMPLETE).write_text("ok\n")
    (d / "metrics.json").write_text("{}")
    assert store.is_complete(d)
    (d / "metrics.json").write_text("{not json")
    assert not store.is_complete(d)


def test_unit_directories_and_weights_get_the_usual_permissions(tmp_path):
    """Was: run directories drwx------ (mkdtemp) and weights -rw------- (safetensors) whatever the umask."""
    import torch
    from safetensors.torch import save_file

    final = tmp_path / "run"
    with store.staging_dir(final) as tmp:
        (tmp / "adapter").mkdir()
        save_file({"w": torch.ones(2)}, str(tmp / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("x")  # what mkdir()/open() give under this process's umask
    dmode, fmode = (stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("plain", "plain.txt"))
    assert stat.S_IMODE(final.stat().st_mode) == dmode
    assert stat.S_IMODE((final / "adapter").stat().st_mode) == dmode
    assert stat.S_IMODE((final / "adapter" / "adapter_model.safetensors").stat().st_mode) == fmode
    assert stat.S_IMODE((final / store.COMPLETE).stat().st_mode) == fmode


def test_a_failed_write_names_the_path_and_the_cause(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    store.atomic_write_json(target, {"ok": 1})

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(store.StoreError, match=rf"cannot write {target}: No space left on device.*free disk"):
        store.atomic_write_json(target, {"ok": 2})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temp file left behind


def _read_only(monkeypatch, root):
    """Simulate a read-only file system under ``root`` (tests run as root here, which chmod does not stop)."""
    real_open, real_mkdir = os.open, os.mkdir

    def guard(path):
        if str(os.path.abspath(path)).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def fake_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            guard(path)
        return real_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        guard(path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_read_only_results_dir_is_a_clear_error(glue_dir, tmp_path, monkeypatch):
    out = tmp_path / "results"
    _read_only(monkeypatch, out)
    r = CliRunner().invoke(app, ["run", TINY, "--data-dir", str(glue_dir), "--set", f"output_dir={out}",
                                 "--only", "baselines", "--set", "tasks=[rte]"])
    assert r.exit_code == 2, r.output
    assert str(out) in r.output and "Read-only file system" in r.output and "Traceback" not in r.output


def test_full_disk_in_phase_2_stops_with_the_path_and_the_cause(glue_dir, tmp_path, monkeypatch):
    """Was: phase-2 write failures showed only as progress lines and the run ended in a phase-3 traceback."""
    from lorastudy import modeling

    def no_space(model, path, method, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(modeling, "save_model", no_space)
    out = tmp_path / "results"
    r = CliRunner().invoke(app, ["run", TINY, "--data-dir", str(glue_dir), "--set", f"output_dir={out}",
                                 "--from", "train", "--set", "tasks=[rte]", "--set", "methods=[lora]",
                                 "--set", "seeds=[42]", "--set", "train.max_steps=2"])
    assert r.exit_code == 2, r.output
    assert "No space left on device [errno 28]" in r.output and "phase2/rte/lora/seed42" in r.output
    assert "phase extract" not in r.output and "Traceback" not in r.output
    assert not store.is_complete(store.run_dir(out, "rte", "lora", 42))


def test_second_process_on_a_results_dir_is_refused_naming_the_holder(glue_dir, tmp_path):
    """Was: two `lorastudy run` processes on one results dir both succeeded silently, doing all work twice."""
    out = tmp_path / "results"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lorastudy import store\n"
         f"with store.results_lock({str(out)!r}, 'lorastudy run holder.yaml'):\n"
         "    print('locked', flush=True)\n    time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["run", TINY, "--data-dir", str(glue_dir), "--set", f"output_dir={out}", "--only", "baselines",
                "--set", "tasks=[rte]"]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, r.output
        for part in (str(out), "in use", f"pid {holder.pid}", socket.gethostname(), "lorastudy run holder.yaml",
                     "since"):
            assert part in r.output, part
        r = CliRunner().invoke(app, ["train-all", TINY, "--data-dir", str(glue_dir), "--set", f"output_dir={out}"])
        assert r.exit_code == 2 and "in use" in r.output
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases the lock of a killed holder
        holder.wait()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
