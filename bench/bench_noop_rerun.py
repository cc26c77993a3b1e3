"""Benchmark: a no-op rerun costs the manifests, not the bytes (issue 14, finding 10).

Two pipelines, the same recipe (configs/tiny.yaml up to `merge`, `digits` analysis so
that no stage needs long forward passes): one with the tiny model, one with the tiny
preset scaled up to about 240M parameters, so that its train, anneal and merge
artifacts hold about 3 GB of fp32 weights. Each is run once to fill its store (not
measured); then their no-op reruns (`longrecipe run` again, every stage Cached) are
timed side by side, alternating, and the ratio of the medians is printed. A rerun that
re-read the artifacts would pay for every byte of those weights.

    python bench/bench_noop_rerun.py [--repeats 3] [--hidden 1024] [--layers 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--until", "merge", "--set", "analyze.method=digits", "--set", "train.optim.max_steps=2",
          "--set", "train.optim.grad_accum=1"]


def big_model(hidden: int, layers: int) -> list[str]:
    return ["--set", f"model.tiny.hidden_size={hidden}", "--set", f"model.tiny.intermediate_size={4 * hidden}",
            "--set", f"model.tiny.num_hidden_layers={layers}", "--set", "model.tiny.num_attention_heads=16",
            "--set", "model.tiny.num_key_value_heads=4"]


def run(work: Path, name: str, extra: list[str]) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "LONGRECIPE_"))}
    env.update(PREFECT_HOME=str(work / f"{name}-prefect"), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, "-m", "longrecipe", "run", "configs/tiny.yaml", "--device", "cpu",
           "--store", str(work / f"{name}-store"), *COMMON, *extra]
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return seconds, r.stdout


def all_cached(work: Path, name: str) -> bool:
    con = sqlite3.connect(work / f"{name}-prefect" / "prefect.db")
    try:
        run_id = con.execute("SELECT id FROM flow_run ORDER BY created DESC LIMIT 1").fetchone()[0]
        states = {s for (s,) in con.execute("SELECT state_name FROM task_run WHERE flow_run_id = ?", (run_id,))}
    finally:
        con.close()
    return states == {"Cached"}


def weights(work: Path, name: str) -> int:
    from longrecipe.artifacts import ArtifactStore

    store = ArtifactStore(work / f"{name}-store")
    return sum(f["size"] for r in store.iter_refs() for f in r.manifest["files"]
               if f["path"].endswith(".safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--keep", type=Path, help="Work in this folder and keep it (default: a temp folder).")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-noop-"))
    work.mkdir(parents=True, exist_ok=True)
    sides = {"tiny": [], "big": big_model(args.hidden, args.layers)}
    for name, extra in sides.items():
        seconds, out = run(work, name, extra)
        print(f"{name}: first run {seconds:.1f} s, {weights(work, name) / 1e9:.2f} GB of weights in its artifacts")
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, extra in sides.items():
            seconds, _ = run(work, name, extra)
            if not all_cached(work, name):
                sys.exit(f"{name}: the rerun recomputed a stage; not a no-op")
            times[name].append(seconds)
    for name, ts in times.items():
        print(f"{name}: no-op rerun " + ", ".join(f"{t:.2f}" for t in ts) + f" s (median {statistics.median(ts):.2f})")
    ratio = statistics.median(times["big"]) / statistics.median(times["tiny"])
    print(f"big / tiny no-op rerun: {ratio:.3f}x (goal: at most 1.2x)")


if __name__ == "__main__":
    main()
