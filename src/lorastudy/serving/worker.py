"""A subprocess that serves one engine, and the JSON contract between it and the benchmark.

Why a subprocess: vLLM allows one ``LLM`` engine per process (a second one fails its memory-profiling check), so
each vLLM configuration runs in a process of its own; the benchmark drives several at once (their 50-76 s start-ups
overlap) and interleaves their timed blocks with its own engines'.

The contract (``PROTOCOL`` = 1), one JSON object per line:

- The parent runs ``python -m MODULE SPEC_JSON`` (any argv in tests). The worker's stdout carries the protocol only:
  at start the worker moves its file descriptor 1 onto stderr, so whatever a library prints cannot corrupt the
  channel; stderr is free text (logs), kept in a file by the parent and quoted when something fails.
- First message from the worker: ``{"event": "ready", ...info}``, ``{"event": "unavailable", "reason": str}``
  (the engine cannot run here, e.g. vLLM is not importable: not a failure; the worker exits 0) or
  ``{"event": "error", "error": str, "traceback": str}`` (the worker exits 1).
- Then the parent writes commands to the worker's stdin, ``{"cmd": NAME, ...arguments}``; each gets exactly one
  ``{"event": "reply", "cmd": NAME, ...results}`` or an ``error`` message (after which the worker exits).
  ``{"cmd": "exit"}`` is answered and the worker exits 0.
- Every message carries ``"protocol": 1``. Anything else (a non-JSON line, another event, a reply to another
  command, the process ending or a timeout) is a broken contract: ``WorkerError``, and the process group is killed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

PROTOCOL = 1
EVENTS = ("ready", "unavailable", "reply", "error")


class WorkerError(RuntimeError):
    """A worker failed or broke the contract; the message names the worker and quotes its stderr tail."""


class WorkerUnavailable(RuntimeError):
    """The worker's engine cannot run on this machine (a reason, not a failure)."""


class WorkerClient:
    """The parent's side: start, wait until ready, send commands, close. Reads the worker's stdout on a thread, so
    every wait has a timeout and a hung worker cannot hang the benchmark."""

    def __init__(self, argv: list[str], label: str, env: dict | None = None, cwd: str | None = None):
        self.argv, self.label, self.env, self.cwd = argv, label, env, cwd
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self._lines: queue.Queue = queue.Queue()
        self._err = tempfile.NamedTemporaryFile(prefix=f"worker-{label}-", suffix=".log", delete=False)

    def start(self) -> WorkerClient:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     env=self.env, cwd=self.cwd, text=True, bufsize=1, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of stream

    def stderr_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self._err.name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _fail(self, msg: str) -> WorkerError:
        self.kill()
        tail = self.stderr_tail()
        return WorkerError(f"worker {self.label}: {msg}" + (f"\n--- its stderr (last lines) ---\n{tail}" if tail
                                                            else ""))

    def _next(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise self._fail(f"no message within {timeout:.0f} s") from None
        if line is None:
            code = self.proc.wait()
            raise self._fail(f"exited (code {code}) without a message")
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            raise self._fail(f"broke the contract: not a JSON line: {line[:200]!r}") from None
        if not isinstance(msg, dict) or msg.get("protocol") != PROTOCOL or msg.get("event") not in EVENTS:
            raise self._fail(f"broke the contract: {str(msg)[:200]}")
        if msg["event"] == "error":
            raise self._fail(f"failed: {msg.get('error')}\n{msg.get('traceback', '')}".rstrip())
        return msg

    def wait_ready(self, timeout: float) -> dict:
        """The worker's ``ready`` info; ``WorkerUnavailable`` with its reason; ``WorkerError`` otherwise."""
        msg = self._next(timeout)
        if msg["event"] == "unavailable":
            self.proc.wait(timeout=30)
            raise WorkerUnavailable(str(msg.get("reason")))
        if msg["event"] != "ready":
            raise self._fail(f"broke the contract: expected ready, got {msg['event']}")
        self.info = {k: v for k, v in msg.items() if k not in ("event", "protocol")}
        return self.info

    def request(self, cmd: str, timeout: float = 600.0, **args) -> dict:
        """Send one command and return its reply's fields."""
        if self.proc is None or self.proc.poll() is not None:
            raise self._fail("is not running")
        try:
            self.proc.stdin.write(json.dumps({"protocol": PROTOCOL, "cmd": cmd, **args}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise self._fail(f"stdin closed ({e})") from None
        msg = self._next(timeout)
        if msg["event"] != "reply" or msg.get("cmd") != cmd:
            raise self._fail(f"broke the contract: expected the reply to {cmd!r}, got {str(msg)[:200]}")
        return {k: v for k, v in msg.items() if k not in ("event", "protocol", "cmd")}

    def kill(self) -> None:
        """End the worker's whole process group (its own children included)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait()

    def close(self, timeout: float = 60.0) -> None:
        """Ask the worker to exit; kill it if it does not within ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.request("exit", timeout=timeout)
                self.proc.wait(timeout=timeout)
            except (WorkerError, subprocess.TimeoutExpired):
                pass
        self.kill()
        Path(self._err.name).unlink(missing_ok=True)

    def __enter__(self) -> WorkerClient:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def serve(setup: Callable[[dict], tuple[dict, dict[str, Callable[..., dict]]]], argv: list[str] | None = None
          ) -> int:
    """The worker's side: ``setup(spec) -> (ready info, {command name: handler(**args) -> reply fields})``, then
    answer commands until ``exit``. ``setup`` raising ``WorkerUnavailable`` reports the reason and exits 0; any
    other exception reports an error with its traceback and exits 1. Returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)  # library prints (vLLM logs to stdout) go to stderr, never into the channel

    parent = os.getppid()

    def orphan_watch() -> None:  # the parent was killed (no exit command will come): end now, free the GPU
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=orphan_watch, daemon=True).start()

    def send(event: str, **fields) -> None:
        channel.write(json.dumps({"protocol": PROTOCOL, "event": event, **fields}) + "\n")
        channel.flush()

    try:
        spec = json.loads(Path(argv[0]).read_text())
        info, handlers = setup(spec)
    except WorkerUnavailable as e:
        send("unavailable", reason=str(e))
        return 0
    except Exception as e:  # report, then exit 1: the parent shows it
        send("error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        return 1
    send("ready", **info)
    for line in sys.stdin:
        cmd = None
        try:
            msg = json.loads(line)
            cmd = msg.pop("cmd")
            msg.pop("protocol", None)
            if cmd == "exit":
                send("reply", cmd=cmd)
                return 0
            if cmd not in handlers:
                raise ValueError(f"unknown command {cmd!r}; known: {sorted(handlers)}")
            send("reply", cmd=cmd, **handlers[cmd](**msg))
        except Exception as e:
            send("error", error=f"{type(e).__name__} in {cmd!r}: {e}", traceback=traceback.format_exc())
            return 1
    return 0
