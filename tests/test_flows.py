"""The Prefect pipeline end to end with the tiny recipe: caching, resume after a failure,
after SIGKILL (during analyze and during train), `prefect flow-run retry`, and a corrupt
artifact. Each run goes through the real CLI (`longrecipe run`) in a subprocess."""

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

import pyarrow.parquet as pq
import pytest

from longrecipe.artifacts import ArtifactStore
from tasks.common import FAIL_ONCE_ENV

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
# Small parts and frequent checkpoints, so a kill lands between two of them.
OVERRIDES = ["analyze.shard_docs=1", "train.optim.checkpoint_every=1", "train.optim.max_steps=6"]
VOLATILE = ("elapsed", "per_s", "second", "created_at")  # timing columns differ run to run


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "prefect"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run_args(store: Path, *extra: str) -> list[str]:
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    return [sys.executable, "-m", "longrecipe", "run", "configs/tiny.yaml", "--store", str(store),
            "--device", "cpu", *sets, *extra]


def run_cli(tmp: Path, store: Path, *extra: str, timeout: int = 600,
            fail_once_at: str | None = None) -> subprocess.CompletedProcess:
    env = _env(tmp) | ({FAIL_ONCE_ENV: fail_once_at} if fail_once_at else {})
    return subprocess.run(_run_args(store, *extra), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def keys(store: Path) -> dict[str, str]:
    return {f"{r.stage}/{r.key}": r.key for r in ArtifactStore(store).iter_refs()}


def content(store: Path) -> dict[str, object]:
    """Every table of every artifact, minus timing columns, plus model file hashes."""
    out = {}
    for ref in ArtifactStore(store).iter_refs():
        for table in ref.tables():
            t = ref.read_table(table)
            t = t.drop_columns([c for c in t.column_names if any(v in c for v in VOLATILE)])
            out[f"{ref.stage}/{ref.key}/{table}"] = _nan_free(t.to_pylist())
        for f in ref.manifest["files"]:
            if f["path"].endswith(".safetensors"):
                out[f"{ref.stage}/{ref.key}/{f['path']}"] = f["sha256"]
    return out


def _nan_free(x):
    """NaN != NaN; compare it as None."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, list):
        return [_nan_free(v) for v in x]
    if isinstance(x, dict):
        return {k: _nan_free(v) for k, v in x.items()}
    return x


def task_states(tmp: Path) -> list[tuple[str, str]]:
    """(task run name, state name) of the newest flow run, from Prefect's SQLite database."""
    db = tmp / "prefect" / "prefect.db"
    con = sqlite3.connect(db)
    try:
        run_id = con.execute("SELECT id FROM flow_run ORDER BY created DESC LIMIT 1").fetchone()[0]
        return con.execute("SELECT name, state_name FROM task_run WHERE flow_run_id = ? ORDER BY created",
                           (run_id,)).fetchall()
    finally:
        con.close()


def newest_run(tmp: Path, sql: str) -> list[tuple]:
    """Rows of `sql` (with one ? for the flow run id) for the newest flow run."""
    con = sqlite3.connect(tmp / "prefect" / "prefect.db")
    try:
        run_id = con.execute("SELECT id FROM flow_run ORDER BY created DESC LIMIT 1").fetchone()[0]
        return con.execute(sql, (run_id,)).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: what every resumed run must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    r = run_cli(tmp, tmp / "store")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, keys(tmp / "store"), content(tmp / "store")


def test_uninterrupted_run_then_everything_cached(reference):
    tmp, ref_keys, _ = reference
    stages = {k.split("/")[0] for k in ref_keys}
    assert {"ingest", "analyze", "build", "train", "anneal", "merge", "evaluate", "report"} <= stages
    # the first run's log (what the UI shows) has each stage's progress lines
    progress = [m for (m,) in newest_run(tmp, "SELECT message FROM log WHERE flow_run_id = ? "
                                              "AND name = 'longrecipe.progress'")]
    for stage in ("ingest", "analyze", "build", "train", "anneal", "evaluate"):
        assert any(m.startswith(f"{stage}: done: ") for m in progress), (stage, progress)
    r = run_cli(tmp, tmp / "store")
    assert r.returncode == 0, r.stderr[-3000:]
    states = task_states(tmp)
    assert states and all(s == "Cached" for _, s in states), states
    assert keys(tmp / "store") == ref_keys
    # the cached rerun links what it reused: each stage's artifact again, marked reused,
    # under a key naming recipe, stage and method
    arts = newest_run(tmp, "SELECT key, description FROM artifact WHERE flow_run_id = ?")
    got = {k for k, _ in arts}
    assert {"tiny-ingest", "tiny-analyze", "tiny-build-longrecipe", "tiny-build-replay",
            "tiny-train-longrecipe", "tiny-anneal-longrecipe", "tiny-merge-longrecipe",
            "tiny-evaluate", "tiny-scores", "tiny-report"} <= got, got
    assert all(d.startswith("Reused (Cached): ") for _, d in arts), arts
    # its log says what each reused stage republished, without Prefect's two lines per
    # stage around the hook that does it
    logs = [m for (m,) in newest_run(tmp, "SELECT message FROM log WHERE flow_run_id = ?")]
    assert not any("when_cached" in m for m in logs), logs
    assert sum(m.startswith("reused ") and "published again" in m for m in logs) == len(states), logs
    # the end of a terminal run: the scores at a glance and where the report is
    assert "| model |" not in r.stdout and "NIAH 512" in r.stdout and "merged" in r.stdout
    report = next(ArtifactStore(tmp / "store").iter_refs("report"))
    assert f"report: {report.path / 'files' / 'report.md'}" in r.stdout


def test_failed_stage_resumes_with_finished_stages_cached(tmp_path, reference):
    _, ref_keys, ref_content = reference
    store = tmp_path / "store"
    r = run_cli(tmp_path, store, fail_once_at="train")
    assert r.returncode == 1 and "injected failure" in r.stderr
    assert not any(k.startswith("train/") for k in keys(store))
    r = run_cli(tmp_path, store)
    assert r.returncode == 0, r.stderr[-3000:]
    states = dict(task_states(tmp_path))
    assert states["ingest"] == states["analyze"] == "Cached"
    assert states["train"] == "Completed"
    assert keys(store) == ref_keys and content(store) == ref_content


def _kill_when(tmp: Path, store: Path, pattern: str, timeout: float = 300) -> None:
    proc = subprocess.Popen(_run_args(store), cwd=ROOT, env=_env(tmp), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if list(store.glob(pattern)):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return
            if proc.poll() is not None:
                pytest.fail(f"run ended (rc={proc.returncode}) before {pattern} appeared")
            time.sleep(0.02)
        pytest.fail(f"{pattern} never appeared")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("stage,pattern", [
    ("analyze", "analyze/*.partial/token_scores/part-00000.parquet"),
    ("train", "train/*.scratch/ckpt-*/state.json"),
])
def test_sigkill_resumes_from_last_part(tmp_path, reference, stage, pattern):
    _, ref_keys, ref_content = reference
    store = tmp_path / "store"
    _kill_when(tmp_path, store, pattern)
    assert not any(k.startswith(f"{stage}/") for k in keys(store))
    r = run_cli(tmp_path, store)
    assert r.returncode == 0, r.stderr[-3000:]
    assert keys(store) == ref_keys and content(store) == ref_content
    ref = next(ArtifactStore(store).iter_refs(stage))
    assert ref.manifest["timings"]["resumed_parts"] >= 1 or ref.info.get("resumed_from_step")


def test_flow_run_retry_resumes(tmp_path, reference):
    _, ref_keys, _ = reference
    store = tmp_path / "store"
    r = run_cli(tmp_path, store, fail_once_at="build")
    assert r.returncode == 1
    con = sqlite3.connect(tmp_path / "prefect" / "prefect.db")
    run_id, state = con.execute("SELECT id, state_name FROM flow_run ORDER BY created DESC LIMIT 1").fetchone()
    con.close()
    assert state == "Failed"
    env = {**_env(tmp_path), "PREFECT_SERVER_EPHEMERAL_ENABLED": "true", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LONGRECIPE_STORE": str(store),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    r = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "retry", run_id,
                        "--entrypoint", "flows/pipeline.py:pipeline"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    con = sqlite3.connect(tmp_path / "prefect" / "prefect.db")
    state = con.execute("SELECT state_name FROM flow_run WHERE id = ?", (run_id,)).fetchone()[0]
    names = dict(con.execute("SELECT name, state_name FROM task_run WHERE flow_run_id = ? "
                             "ORDER BY created", (run_id,)).fetchall())
    con.close()
    assert state == "Completed"
    assert names["ingest"] == "Cached" or names["ingest"] == "Completed"
    assert keys(store) == ref_keys


def test_flipped_byte_recomputes_that_stage_and_says_why(tmp_path, reference):
    _, ref_keys, ref_content = reference
    store = tmp_path / "store"
    assert run_cli(tmp_path, store, "--until", "build").returncode == 0
    analysis = next(ArtifactStore(store).iter_refs("analyze"))
    part = analysis.path / "token_scores" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    r = run_cli(tmp_path, store, "--until", "build")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sha256 differs" in r.stdout + r.stderr and "recomputing" in r.stdout + r.stderr
    states = dict(task_states(tmp_path))
    assert states["ingest"] == "Cached" and states["analyze"] == "Completed"
    fixed = next(ArtifactStore(store).iter_refs("analyze"))
    assert ArtifactStore(store).verify(fixed) == []
    # the recomputed artifact is byte-identical to the uninterrupted run's, so what depends
    # on it keeps its key and stays valid
    got = content(store)
    assert {k.split("/")[0] for k in got} == {"ingest", "analyze", "build"}
    assert got == {k: ref_content[k] for k in got}
    assert pq.read_table(part).num_rows > 0 and json.loads((fixed.path / "manifest.json").read_text())


COMPARE = ["--set", "compare.methods=[full, pose, longrecipe]", "--set", "compare.through=merge",
           "--set", "train.optim.max_steps=2"]


def run_compare(tmp: Path, store: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longrecipe", "compare", "configs/tiny.yaml",
                           "--store", str(store), "--device", "cpu", *COMPARE, *extra],
                          cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def sequential_compare(tmp_path_factory):
    """The comparison with its branches one after another (no compare.devices)."""
    tmp = tmp_path_factory.mktemp("compare")
    r = run_compare(tmp, tmp / "store")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "store"


def test_compare_flow_shares_stages_and_reports_cost_vs_full(sequential_compare):
    s = ArtifactStore(sequential_compare)
    count = {st: len(list(s.iter_refs(st)))
             for st in ("ingest", "analyze", "build", "train", "anneal", "merge", "evaluate")}
    # one shared ingest, analysis and replay; per method its samples, training, annealing,
    # merging and evaluation (+ the base model's evaluation)
    assert count == {"ingest": 1, "analyze": 1, "build": 4, "train": 3, "anneal": 3, "merge": 3,
                     "evaluate": 4}
    methods = {ref.manifest["config"]["method"] for ref in s.iter_refs("build")}
    assert methods == {"full", "pose", "longrecipe"}
    assert not any(ref.info["launched"] for ref in s.iter_refs("train"))  # in the flow's process
    report = next(s.iter_refs("report")).path / "files" / "report.md"
    text = report.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "TFLOPs" not in line}
    assert "1.00" in rows["full"] and rows["longrecipe"].count("|") > 5
    ratio = float(rows["longrecipe"].split("|")[7])
    assert 0 < ratio < 0.5  # 300-token samples vs 1,024: a fraction of full-length cost


def test_compare_branches_run_at_once_on_two_slots_and_equal_the_sequential_run(
    tmp_path, sequential_compare
):
    store = tmp_path / "store"
    r = run_compare(tmp_path, store, "--set", "compare.devices=[cpu, cpu]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert keys(store) == keys(sequential_compare)
    assert content(store) == content(sequential_compare)
    # every training ran in a process of its own (accelerate's state is per process)
    s = ArtifactStore(store)
    assert all(ref.info["launched"] for st in ("train", "anneal") for ref in s.iter_refs(st))
    con = sqlite3.connect(tmp_path / "prefect" / "prefect.db")
    try:
        rows = con.execute("SELECT name, start_time, end_time FROM task_run WHERE name LIKE 'branch-%'"
                           ).fetchall()
        names = [n for (n,) in con.execute("SELECT name FROM task_run")]
    finally:
        con.close()
    assert sorted(n for n, _, _ in rows) == ["branch-base", "branch-full", "branch-longrecipe", "branch-pose"]
    # most branches running at any moment: two, as many as slots
    events = sorted([(a, 1) for _, a, _ in rows] + [(b, -1) for _, _, b in rows])
    running = [sum(d for _, d in events[: i + 1]) for i in range(len(events))]
    assert max(running) == 2
    assert "train-pose [cpu]" in names and "merge-longrecipe [cpu]" in names


def test_report_command_over_the_store(reference, tmp_path):
    ref_tmp, _, _ = reference
    out = tmp_path / "report.md"
    r = subprocess.run([sys.executable, "-m", "longrecipe", "report", "--store", str(ref_tmp / "store"),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "## At a glance" in text and "| base |" in text and "| merged |" in text
    assert "## Training cost" in text and (tmp_path / "heatmaps.png").stat().st_size > 1000
    # figures by name, the store by a relative path; the HTML page beside it embeds them
    assert str(ref_tmp) not in text and "](../" in text and "](niah.png)" in text
    page = out.with_suffix(".html").read_text()
    assert str(ref_tmp) not in page and page.count('<img src="data:image/png;base64,') == 3


def test_reference_training_runs_as_its_own_cached_stages(tmp_path):
    """H' as the paper made it: the base model after a short long-context training, built
    and trained by the flow as ordinary cached stages, then the analysis's reference."""
    store = tmp_path / "store"
    rt = ("analyze.reference_training={build: {method: pose, train_len: 128, target_len: 1024, "
          "num_samples: 2}, train: {optim: {max_steps: 1, precision: fp32}, "
          "rope: {theta: 160000}}}")
    args = ("--until", "analyze", "--set", "analyze.method=logit_delta", "--set", rt)
    r = run_cli(tmp_path, store, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    states = dict(task_states(tmp_path))
    assert states["build-reference"] == states["train-reference"] == states["analyze"] == "Completed"
    s = ArtifactStore(store)
    (analysis,), (trained,), (samples,) = (list(s.iter_refs(x)) for x in ("analyze", "train", "build"))
    assert analysis.manifest["inputs"]["reference"] == trained.key
    assert trained.manifest["inputs"]["samples"] == samples.key
    assert samples.manifest["config"]["method"] == "pose"
    assert analysis.info["sentences_flagged_fraction"] < 0.9
    r = run_cli(tmp_path, store, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(state == "Cached" for _, state in task_states(tmp_path))


def test_finding_7_a_copied_store_prints_its_own_paths(tmp_path, reference):
    """Issue 14, finding 7: a store copied elsewhere (like `cp -r`: new mtimes) reuses every
    stage and prints the copy's folders, not those its cached results were made at."""
    ref_tmp, ref_keys, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(ref_tmp / "store", copy, copy_function=shutil.copy)
    r = run_cli(tmp_path, copy)
    assert r.returncode == 0, r.stderr[-3000:]
    # one line per stage: name, key, folder (the scores at a glance and the report follow)
    printed = [w for w in (line.split() for line in r.stdout.splitlines())
               if len(w) == 3 and w[2].startswith("/")]
    assert {key for _, key, _ in printed} == set(ref_keys.values())
    for _, key, folder in printed:
        assert folder.startswith(f"{copy}/") and folder.endswith(key) and Path(folder).is_dir(), folder
    assert {s for _, s in task_states(tmp_path)} == {"Cached"}
