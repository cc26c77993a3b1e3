"""How `longrecipe run` and `longrecipe compare` run a flow from a terminal.

- Prefect talks to a temporary API that this process owns (flows.server), unless
  PREFECT_API_URL already names a server: Ctrl-C then stops the run in seconds
  (exit 130) and no server outlives the CLI.
- The console shows warnings and one line per error; everything else (INFO
  records, every traceback, the server's output) goes to a log file under
  `$PREFECT_HOME/logs/`, which the error line names. `--verbose` shows it all.
- A full disk under Prefect's database, as the server reports it, ends the run at
  once with one line naming the database. The store survives that exit as it
  survives a kill -9 (every file is written to a temp name and renamed).

Prefect is imported here only after PREFECT_API_URL is set: its settings are read
once, at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from flows.server import TemporaryServer

LOGS_KEPT = 20


class RunSession:
    """The server, the log file and the console filter around one flow run."""

    def __init__(self, home: str | Path, verbose: bool = False):
        self.home, self.verbose = Path(home), verbose
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_path = self.home / "logs" / f"run-{stamp}-{os.getpid()}.log"
        self.server: TemporaryServer | None = None
        self._undo: list = []
        self._file = None
        self._handler = _QuietHandler()
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._details = logging.getLogger("longrecipe.run")
        self._details.propagate = False
        self._details.setLevel(logging.INFO)

    def __enter__(self) -> RunSession:
        self._details.addHandler(self._handler)
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            _prune(self.log_path.parent)
            self._file = open(self.log_path, "a", buffering=1, encoding="utf-8")
            self._handler.setStream(self._file)
            if not os.environ.get("PREFECT_API_URL"):
                self.server = TemporaryServer(self.home, self._server_line, self._server_disk_full)
                self.server.start()
                os.environ["PREFECT_API_URL"] = self.server.api_url
                self._undo.append(lambda: os.environ.pop("PREFECT_API_URL", None))
            import prefect.main  # noqa: F401  (reads the settings above, sets up its logging)
            from prefect.logging.configuration import ensure_logging_setup

            ensure_logging_setup()

            self._route_logs()
            self._quiet_logging_errors()
            if self.server is not None:
                timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 90))
                self.server.wait_ready(timeout)
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not isinstance(exc, SystemExit):
            self.record(exc)
        if self.server is not None:
            t0 = time.monotonic()
            _drain_prefect(timeout=5)
            t1 = time.monotonic()
            self.server.stop()
            self._details.info("Prefect's queues drained in %.2f s, server stopped in %.2f s",
                               t1 - t0, time.monotonic() - t1)
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self._details.removeHandler(self._handler)
        if self._file is not None:
            with contextlib.suppress(OSError):  # a log on a full disk must not hide the error
                self._file.close()

    def record(self, exc: BaseException) -> None:
        """The full traceback of what ended the run, into the log file."""
        self._details.error("the run ended with %s", type(exc).__name__, exc_info=exc)

    # -- logging
    def _route_logs(self) -> None:
        """Every record into the log file (first, with its traceback); on the console only
        warnings, without Prefect's error records and tracebacks (the CLI prints one line)."""
        root = logging.getLogger()
        root.handlers.insert(0, self._handler)
        self._undo.append(lambda: root.removeHandler(self._handler))
        level, console = (logging.INFO, None) if self.verbose else (logging.WARNING, _Console())
        names = [""] + [n for n in logging.Logger.manager.loggerDict
                        if n.split(".")[0] in ("prefect", "uvicorn", "fastapi")]
        for name in names:
            logger = logging.getLogger(name)
            if name and not logger.propagate and logger.handlers:
                logger.handlers.insert(0, self._handler)
                self._undo.append(lambda lg=logger: lg.removeHandler(self._handler))
            for h in logger.handlers:
                if h is self._handler or not isinstance(h, logging.StreamHandler) \
                        or getattr(h, "stream", None) not in (sys.stderr, sys.stdout):
                    continue
                old = h.level
                h.setLevel(max(old, level))
                self._undo.append(lambda h=h, old=old: h.setLevel(old))
                if console is not None:
                    h.addFilter(console)
                    self._undo.append(lambda h=h: h.removeFilter(console))

    def _quiet_logging_errors(self) -> None:
        """No logging errors on the console during the run. Prefect's API log worker reports
        a failed POST /logs/ (a server that cannot write its database) on stderr when
        logging.raiseExceptions is set, and ends that report without a newline
        (prefect/logging/handlers.py, 3.x), so the CLI's "error: ..." line written next
        was glued to it; the stdlib does the same for a log file on a full disk. What ends
        the run is reported in one line and its traceback is in the log file."""
        old = logging.raiseExceptions
        logging.raiseExceptions = False
        self._undo.append(lambda: setattr(logging, "raiseExceptions", old))

    def _server_line(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._file.write(f"server | {line}\n")

    def _server_disk_full(self, line: str) -> None:
        """Called from the server's output thread: report in one line and end the run now.
        Waiting is pointless (every client call would fail and be retried for minutes)."""
        db = database_path(self.home)
        free = _free(db.parent if db else self.home)
        sys.stderr.write(f"error: disk full: Prefect's database {db or '(PREFECT_API_DATABASE_CONNECTION_URL)'} "
                         f"cannot be written ({free} free on that disk); free space and run again, "
                         f"finished stages are kept [log: {self.log_path}]\n")
        sys.stderr.flush()
        self._details.error("server reported: %s", line)
        with contextlib.suppress(OSError, ValueError):
            self._file.flush()
        if self.server is not None and self.server.proc is not None:
            self.server.proc.kill()
        os._exit(1)


def _drain_prefect(timeout: float) -> None:
    """Send Prefect's queued logs and events while the server still answers: left for
    interpreter exit, they would be retried against a stopped server for over a minute."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception as e:  # draining is a courtesy to the UI, never a failure
            logging.getLogger("longrecipe.run").warning("could not drain %s: %s", worker.__name__, e)


class _QuietHandler(logging.StreamHandler):
    """The log file's handler: a write that fails (a full disk) is dropped, not reported
    with a traceback on the console; before the file is open, nothing is written."""

    def __init__(self):
        super().__init__()
        self.stream = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class _Console(logging.Filter):
    """Console side of a run: Prefect's own error records (crash reports, retries,
    tracebacks) are dropped, the CLI's error line says what matters; tracebacks of
    warnings are dropped too. The log file, written before this filter runs, keeps all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.name.split(".")[0] in ("prefect", "uvicorn", "fastapi"):
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def database_path(home: Path) -> Path | None:
    """Where Prefect's SQLite database is, when the settings leave it at its default."""
    for var in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        url = os.environ.get(var)
        if url:
            return Path(url.split(":///", 1)[1]) if url.startswith("sqlite") and ":///" in url else None
    return Path(home) / "prefect.db"


def _free(path: Path) -> str:
    try:
        n = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _prune(folder: Path) -> None:
    """Keep the newest LOGS_KEPT run logs."""
    logs = sorted(folder.glob("run-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-LOGS_KEPT]:
        old.unlink(missing_ok=True)
