"""`longrecipe run` from a terminal's point of view (issue 14): Ctrl-C and kill -9 with the
temporary Prefect server (finding 3), bad input (4) and a full disk (11); a copied store
(7) is in test_flows (it reuses that module's reference run). Each run goes through the
real CLI in a subprocess and costs a server start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longrecipe.artifacts import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "LONGRECIPE_"))}
    env.update(PREFECT_HOME=str(tmp / "prefect"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _args(store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "longrecipe", "run", "configs/tiny.yaml", "--store", str(store),
            "--device", "cpu", *extra]


def _run(tmp: Path, store: Path, *extra: str, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(_args(store, *extra), cwd=ROOT, env=_env(tmp, **env), capture_output=True,
                          text=True, timeout=timeout)


def _states(home: Path) -> dict[str, tuple[str, int]]:
    """Task run name -> (state, run count) of the newest flow run."""
    con = sqlite3.connect(home / "prefect.db")
    try:
        run = con.execute("SELECT id FROM flow_run ORDER BY created DESC LIMIT 1").fetchone()[0]
        rows = con.execute("SELECT name, state_name, run_count FROM task_run WHERE flow_run_id = ?",
                           (run,)).fetchall()
    finally:
        con.close()
    return {name: (state, count) for name, state, count in rows}


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _server_pids(home: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in (home / "servers").glob("*.json")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _wait_for(proc: subprocess.Popen, root: Path, *patterns: str, seconds: float = 300) -> Path:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        hits = sorted(p for pattern in patterns for p in root.glob(pattern))
        if hits:
            return hits[-1]
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc={proc.returncode}) before {patterns} appeared")
        time.sleep(0.05)
    pytest.fail(f"{patterns} never appeared")


@pytest.mark.integration
def test_finding_3_ctrl_c_exits_130_at_once_and_no_server_outlives_the_cli(tmp_path):
    """Finding 3: SIGINT to the process group during train: exit 130 within 5 s with one
    line, the server gone, the stage resumable (the next run continues from the last
    checkpoint); kill -9 of that run's CLI: its server dies too."""
    store, home = tmp_path / "store", tmp_path / "prefect"
    extra = ("--until", "train", "--set", "train.optim.max_steps=40", "--set", "train.optim.checkpoint_every=1")
    err = tmp_path / "err.txt"
    proc = subprocess.Popen(_args(store, *extra), cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=err.open("w"), start_new_session=True)
    try:
        # (checkpoints lived in <key>.partial/_scratch before issue 14)
        _wait_for(proc, store, "train/*.scratch/ckpt-*/state.json", "train/*.partial/_scratch/ckpt-*/state.json")
        servers = _server_pids(home)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        start = time.monotonic()
        rc = proc.wait(30)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 130 and elapsed < 5, (rc, elapsed, err.read_text()[-2000:])
    lines = _error_lines(err.read_text())
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err.read_text()
    assert len(servers) == 1 and _wait_gone(servers[0], 5)
    assert list(store.glob("train/*.partial")) and list(store.glob("train/*.scratch/ckpt-*"))
    assert not list(ArtifactStore(store).iter_refs("train"))

    first_ckpt = sorted(store.glob("train/*.scratch/ckpt-*"))[-1]
    first = first_ckpt.name
    before = json.loads((first_ckpt / "state.json").read_text())["metrics"]
    proc = subprocess.Popen(_args(store, *extra), cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:  # a checkpoint after `first`, complete (state.json is written last)
            later = [p for p in sorted(store.glob("train/*.scratch/ckpt-*")) if p.name > first]
            try:
                after = json.loads((later[-1] / "state.json").read_text())["metrics"] if later else None
            except (OSError, ValueError):  # removed or half-renamed between glob and read
                after = None
            if after is not None:
                break
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        # resumed, not restarted: the steps before the kill are carried over as they were
        # (their wall times included), not computed again (checkpoints are rotated, so
        # the next one seen may be a few steps later on a busy machine)
        assert after[: len(before)] == before and len(after) > len(before), (first, len(after))
        servers = [p for p in _server_pids(home) if _alive(p)]
        assert len(servers) == 1
        os.kill(proc.pid, signal.SIGKILL)  # the CLI only, not its group
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _wait_gone(servers[0], 10), "the server outlived a kill -9 of its CLI"
    from flows.server import reap_stale

    assert reap_stale(home) == [] and not list((home / "servers").glob("*.json"))


def test_finding_3_a_stale_server_is_reaped_on_the_next_start(tmp_path):
    """Where no parent-death signal exists, the record of a server whose CLI is gone lets
    the next start stop it; a live CLI's server is left alone."""
    from flows.server import APP, _started, reap_stale

    home = tmp_path / "prefect"
    (home / "servers").mkdir(parents=True)
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", APP])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", APP])
    try:
        (home / "servers" / f"{fake.pid}.json").write_text(json.dumps({"pid": fake.pid, "parent": gone.pid}))
        (home / "servers" / "junk.json").write_text("{")
        (home / "servers" / f"{live.pid}.json").write_text(json.dumps(
            {"pid": live.pid, "parent": os.getpid(), "parent_started": _started(os.getpid())}))
        assert reap_stale(home) == [fake.pid]
        assert fake.wait(10) is not None and live.poll() is None
        assert sorted(p.name for p in (home / "servers").iterdir()) == [f"{live.pid}.json"]
    finally:
        for p in (fake, live):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.integration
def test_finding_4_bad_input_exits_2_with_one_line_and_is_not_retried(tmp_path):
    """Finding 4 through the CLI: each case exits 2 with one `error:` line naming the file
    (and line), no traceback on the console; the runtime ones name a log file that holds
    the traceback, and their task ran once."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine. ok."}\n{"text": "bad \xff byte"}\n')
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama",')
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    cases = [
        (["--set", f"ingest.sources=[{{path: {bad}}}]"], f"{bad}:2: not UTF-8", True),
        (["--set", f"ingest.sources=[{{path: {empty}}}]"], f"{empty}: not a readable Parquet file", True),
        (["--set", f"model.source={model}"], f"{model}/config.json:", False),
        (["--set", f"model.source={fake}"], f"{fake}: not a GGUF file", False),
    ]
    for i, (extra, expected, runtime) in enumerate(cases):
        r = _run(tmp_path, tmp_path / f"store{i}", "--until", "ingest", *extra)
        out = r.stdout + r.stderr
        lines = _error_lines(r.stderr)
        assert r.returncode == 2, (extra, out[-3000:])
        assert len(lines) == 1 and expected in lines[0], (expected, out[-3000:])
        assert "Traceback" not in out and len([x for x in r.stderr.splitlines() if x.strip()]) <= 2, out
        if runtime:
            log = Path(lines[0].rsplit("[log: ", 1)[1].rstrip("]"))
            assert "Traceback" in log.read_text() and expected in log.read_text()
            assert _states(tmp_path / "prefect")["ingest"] == ("Failed", 1)  # not retried


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(not _can_mount(), reason="needs `unshare -m` and mount (root) for a small tmpfs")
def test_finding_11_a_full_disk_is_one_line_naming_the_path_quickly(tmp_path):
    """Finding 11: Prefect's database on a disk that fills up: the run ends within seconds
    of the first failed write, one line naming the database; the same for Prefect's home
    and for the store (a part's path)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    py = sys.executable
    script = f"""
set -u
mount -t tmpfs -o size=48m none {disk}
cd {ROOT}
DB="sqlite+aiosqlite:///{disk}/prefect.db"
run() {{ PREFECT_API_DATABASE_CONNECTION_URL="$DB" PREFECT_HOME="$1" {py} -m longrecipe run configs/tiny.yaml \
    --device cpu --store "$2" --until "$3" > "$4.out" 2> "$4.err"; echo $? > "$4.rc"; }}
run {tmp_path}/home {tmp_path}/s1 ingest {tmp_path}/first
mkdir -p {disk}/store {disk}/home
dd if=/dev/zero of={disk}/fill bs=1M count=64 2>/dev/null
start=$(date +%s%N); run {tmp_path}/home {tmp_path}/s2 build {tmp_path}/db; end=$(date +%s%N)
echo $(( (end - start) / 1000000 )) > {tmp_path}/db.ms
run {disk}/home {tmp_path}/s3 build {tmp_path}/home
DB="sqlite+aiosqlite:///{tmp_path}/other.db"
run {tmp_path}/home2 {disk}/store ingest {tmp_path}/store
"""
    r = subprocess.run(["unshare", "-m", "bash", "-c", script], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr

    def outcome(name):
        return int((tmp_path / f"{name}.rc").read_text()), (tmp_path / f"{name}.err").read_text()

    assert outcome("first")[0] == 0, outcome("first")[1][-2000:]
    for name, path in (("db", f"{disk}/prefect.db"), ("home", f"{disk}/home"), ("store", f"{disk}/store/ingest/")):
        rc, err = outcome(name)
        lines = _error_lines(err)
        assert rc == 1 and len(lines) == 1 and "disk full" in lines[0] and path in lines[0], (name, err[-3000:])
        assert "Traceback" not in err and len(err.splitlines()) <= 3, (name, err[-3000:])
    assert int((tmp_path / "db.ms").read_text()) < 40_000  # a server start and the first write


def test_each_way_out_of_a_run_has_its_exit_code_and_one_line():
    from prefect.exceptions import TerminationSignal

    from longrecipe.cli import _classify
    from longrecipe.errors import DiskFullError
    from longrecipe.ingest import IngestError

    try:
        try:
            raise OSError(28, "No space left on device", "/s/x.json")
        except OSError as inner:
            raise RuntimeError("could not persist the result") from inner
    except RuntimeError as e:
        chained = e
    cases = [
        (KeyboardInterrupt(), 130, "interrupted"),
        (TerminationSignal(15), 143, "SIGTERM"),
        (DiskFullError("/store/ingest/k.partial/documents/part-00000.parquet"), 1, "part-00000.parquet"),
        (chained, 1, "disk full: no space left writing /s/x.json"),
        (IngestError("corpus.jsonl:3: no field 'text'"), 2, "corpus.jsonl:3"),
        (RuntimeError("boom"), 1, "RuntimeError: boom"),
    ]
    for exc, code, text in cases:
        got_code, msg = _classify(exc, "/store")
        assert got_code == code and text in msg and "\n" not in msg, (exc, got_code, msg)


def test_finding_11_no_logging_error_reaches_the_console_during_a_run(tmp_path, monkeypatch, capsys):
    """Finding 11, seen again under load: with the database full, Prefect's API log worker
    wrote "--- Error logging to API ---" and the server's 500 without a newline to stderr,
    and the one "error: disk full ..." line was glued to its end. Prefect's real handler
    runs here inside a session (an API URL is set, so no server starts)."""
    import asyncio

    from prefect.logging.handlers import APILogWorker

    from flows.runner import RunSession

    class Refusing:
        async def request(self, *args, **kwargs):
            raise RuntimeError("Server error '500 Internal Server Error' for url '/logs/'")

    worker = APILogWorker.__new__(APILogWorker)  # its queue thread is not needed to run one batch
    worker._client = Refusing()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with RunSession(tmp_path / "home"):
        asyncio.run(worker._handle_batch([b"{}"]))
        logging_error = capsys.readouterr().err
    asyncio.run(worker._handle_batch([b"{}"]))  # outside a session Prefect's report is back
    assert logging_error == ""
    assert "Error logging to API" in capsys.readouterr().err
