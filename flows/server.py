"""The temporary Prefect API of one `longrecipe run`, started and owned by the CLI.

Prefect's own temporary server (`SubprocessASGIServer` in prefect.server.api.server)
is a plain child of the CLI: a terminal's Ctrl-C reaches it with the rest of the
process group and kills it first, after which the client retries the dead API for
over a minute; a kill -9 of the CLI leaves it running for good. This one runs the
same app (uvicorn, the `create_app` factory, the same ephemeral settings) but

- in its own session, so Ctrl-C reaches only the CLI, which records the crash and
  then stops the server;
- with a parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`), so it dies with the
  CLI even after a kill -9;
- with a record under `$PREFECT_HOME/servers/`, so the next start reaps a server
  whose CLI is gone where no parent-death signal exists;
- with its output in the run's log file, scanned for a full disk.

This module imports nothing from Prefect: the caller sets PREFECT_API_URL before
Prefect is imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from longrecipe.errors import DiskFullError, is_disk_full

APP = "prefect.server.api.server:create_app"
PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """The temporary server did not start."""


class TemporaryServer:
    """One Prefect API on 127.0.0.1, for the lifetime of this process at most."""

    def __init__(self, home: Path, log: Callable[[str], None], on_disk_full: Callable[[str], None]):
        self.home, self.log, self.on_disk_full = Path(home), log, on_disk_full
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.record: Path | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Launch the server (returns at once; `wait_ready` waits for it)."""
        reap_stale(self.home)
        self.port = _free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "uvicorn", "--factory", APP, "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        self.record = self.home / "servers" / f"{self.proc.pid}.json"
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            self.record.write_text(json.dumps({"pid": self.proc.pid, "parent": os.getpid(),
                                               "parent_started": _started(os.getpid()),
                                               "port": self.port}))
        except OSError as e:
            self.stop()
            if is_disk_full(e):
                raise DiskFullError(str(self.record)) from e
            raise
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True,
                         name="prefect-server-output").start()

    def wait_ready(self, timeout: float) -> None:
        """Wait until /api/health answers; ServerError when the server exits or times out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"the temporary Prefect server exited with code "
                                  f"{self.proc.returncode} before it answered")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise ServerError(f"the temporary Prefect server did not answer within {timeout:.0f} s "
                          "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def stop(self, grace: float = 3.0) -> None:
        """Terminate the server (then kill it after `grace` seconds) and drop its record."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.record is not None:
            self.record.unlink(missing_ok=True)

    def _pump(self, proc: subprocess.Popen) -> None:
        """Copy the server's output to the log; a full disk is reported once, at once."""
        warned = False
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log(line)
            if not warned and ("database or disk is full" in line or "No space left" in line):
                warned = True
                self.on_disk_full(line)


def reap_stale(home: Path) -> list[int]:
    """Stop temporary servers whose CLI is gone (their record says which process started
    them); returns the pids stopped. A record of a server already gone is dropped."""
    stopped = []
    for rec in sorted((Path(home) / "servers").glob("*.json")):
        try:
            info = json.loads(rec.read_text())
            pid, parent = int(info["pid"]), int(info["parent"])
        except (OSError, ValueError, KeyError, TypeError):
            rec.unlink(missing_ok=True)
            continue
        if _alive(parent) and _started(parent) == info.get("parent_started"):
            continue  # its CLI is still running
        if _alive(pid) and APP in _cmdline(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
                for _ in range(30):
                    if not _alive(pid):
                        break
                    time.sleep(0.1)
                else:
                    os.kill(pid, signal.SIGKILL)
            stopped.append(pid)
        rec.unlink(missing_ok=True)
    return stopped


def _die_with_parent(parent: int):
    """preexec_fn for Linux: SIGTERM this child when the process that started it dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    except (OSError, AttributeError):
        return None

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _started(pid: int) -> str | None:
    """The process's start time (Linux), to tell a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        try:
            return subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                                  text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
