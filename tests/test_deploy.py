"""Deployments on loopback: a Prefect server, a `process` pool, `prefect --no-prompt deploy
--all`, a deployment run with parameters, a worker with --run-once, then the concurrent
comparison through the same pool; all stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from longrecipe.artifacts import ArtifactStore

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deploy_and_run_through_a_worker(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=api, DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="2",
               LONGRECIPE_STORE=str(store), OMP_NUM_THREADS="1", PWD=str(ROOT), COLUMNS="250")
    server = subprocess.Popen(PREFECT + ["server", "start", "--host", "127.0.0.1", "--port", str(port),
                                         "--analytics-off"], cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                assert server.poll() is None, "server exited"
                time.sleep(1)

        def prefect(*args, timeout=300):
            r = subprocess.run(PREFECT + list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=timeout)
            assert r.returncode == 0, f"prefect {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            return r.stdout

        prefect("work-pool", "create", "longrecipe", "--type", "process")
        out = prefect("--no-prompt", "deploy", "--all")
        assert "longrecipe-pipeline/pipeline" in out
        prefect("deployment", "run", "longrecipe-pipeline/pipeline",
                "--param", "config=configs/tiny.yaml", "--param", 'overrides=["build.num_samples=4"]',
                "--param", "until=build")
        prefect("worker", "start", "--pool", "longrecipe", "--run-once", timeout=600)
        refs = list(ArtifactStore(store).iter_refs())
        assert {r.stage for r in refs} == {"ingest", "analyze", "build"}
        build = next(r for r in refs if r.stage == "build")
        assert build.manifest["config"]["num_samples"] == 4
        runs = prefect("flow-run", "ls")
        assert "COMPLETED" in runs

        # the process pool runs the concurrent comparison: two CPU slots stand in for GPUs
        prefect("deployment", "run", "longrecipe-compare/compare", "--param", "config=configs/tiny.yaml",
                "--param", "device=cpu", "--param",
                'overrides=["compare.devices=[cpu, cpu]", "compare.methods=[full, pose]", '
                '"train.optim.max_steps=2"]')
        prefect("worker", "start", "--pool", "longrecipe", "--run-once", timeout=600)
        trained = list(ArtifactStore(store).iter_refs("train"))
        assert len(trained) == 2 and all(r.info["launched"] for r in trained)  # a process each
        assert len(list(ArtifactStore(store).iter_refs("report"))) == 1
        runs = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{api}/task_runs/filter", data=json.dumps({"limit": 50}).encode(),
            headers={"Content-Type": "application/json"}, method="POST"), timeout=10).read())
        span = {t["name"]: (t["start_time"], t["end_time"]) for t in runs if t["name"].startswith("branch-")}
        assert set(span) == {"branch-base", "branch-full", "branch-pose"}
        assert span["branch-base"][0] < span["branch-full"][1] and span["branch-full"][0] < span["branch-base"][1]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
