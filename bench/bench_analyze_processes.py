"""Benchmark: the analyze stage (lsd) on N processes against one, on the same documents.

One process runs in this process (the default path); N processes run under `accelerate
launch` (analyze.num_processes, longrecipe.launch), each scoring its share of the shards.
Every process gets one torch thread (runtime.threads=1 and OMP_NUM_THREADS=1), so on an
idle machine with N cores the ideal is N x. Throughput is the stage's own figure
(manifest info `tokens_per_s`: document tokens scored over the slowest process's compute
time, model loading and process start excluded); the wall time of each run, launch
included, is printed beside it. The two artifacts must be equal (same key, same table
bytes) before any figure is printed. The machine's load average is printed before and
after (these machines are shared), and a control measures what it had free: plain
single-threaded matrix products in N processes at once against one.

    python bench/bench_analyze_processes.py                         # 2 processes vs 1
    python bench/bench_analyze_processes.py --processes 4 --docs 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def load_average() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def _matmuls(n: int) -> float:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(384, 384)
    t0 = time.perf_counter()
    for _ in range(n):
        a = torch.tanh(a @ a * 1e-2)
    return time.perf_counter() - t0


def machine_parallelism(processes: int, n: int = 600) -> float:
    """What the machine gives `processes` single-threaded processes right now: the same
    matrix products in one process, then in `processes` at once (aggregate rate ratio).
    On an idle machine with that many cores it is close to `processes`."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        pool.map(_matmuls, [50] * processes)  # warm up, start-up out of the figures
        one = pool.apply(_matmuls, (n,))
        t0 = time.perf_counter()
        pool.map(_matmuls, [n] * processes)
        together = time.perf_counter() - t0
    return processes * one / together


def corpus(path: Path, n_docs: int, words: int) -> Path:
    """Synthetic documents of about `words` words each (sentences of numbered items)."""
    with open(path, "w") as fh:
        for i in range(n_docs):
            text = " ".join(f"Item {j} of list {i} is w{(j * 7 + i) % 97}." for j in range(words // 6))
            fh.write(json.dumps({"text": text}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--words", type=int, default=600, help="words per document (~5 tokens each)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shard-docs", type=int, default=2)
    args = ap.parse_args()

    from longrecipe import (
        AnalyzeConfig,
        ArtifactStore,
        IngestConfig,
        ModelSpec,
        RuntimeConfig,
        SourceSpec,
        TinyModelConfig,
        run_analyze,
        run_ingest,
    )

    model = ModelSpec(tiny=TinyModelConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                           num_hidden_layers=args.layers, num_attention_heads=4,
                                           num_key_value_heads=4, max_position_embeddings=4096))
    runtime = RuntimeConfig(progress=False, device="cpu", threads=1)
    cfg = AnalyzeConfig(method="lsd", max_context=2048, short_window=128, short_stride=64,
                        shard_docs=args.shard_docs, batch_tokens=4096)
    print(f"load average before: {load_average()}  (cores: {os.cpu_count()})")
    with tempfile.TemporaryDirectory() as tmp:
        path = corpus(Path(tmp) / "bench.jsonl", args.docs, args.words)
        ingest = IngestConfig(sources=[SourceSpec(path=str(path))], heldout_fraction=0.0)
        runs = {}
        for n in (1, args.processes):
            store = ArtifactStore(Path(tmp) / f"store-{n}")
            documents = run_ingest(ingest, model, store, runtime)
            t0 = time.perf_counter()
            ref = run_analyze(cfg.model_copy(update={"num_processes": n}), documents, model, store, runtime)
            runs[n] = (ref, time.perf_counter() - t0)
        (one, wall1), (many, wall_n) = runs[1], runs[args.processes]
        same = one.key == many.key and {f["path"]: f["sha256"] for f in one.manifest["files"]} == {
            f["path"]: f["sha256"] for f in many.manifest["files"]}
        if not same:
            raise SystemExit("the artifacts differ: no figures")
    control = machine_parallelism(args.processes)
    print(f"load average after:  {load_average()}")
    info = one.info
    print(f"model: tiny Llama hidden {args.hidden}, {args.layers} layers; {info['documents']} documents, "
          f"{info['tokens']:,} tokens, {info['shards']} shards, {info['forward_tokens']:,} forwarded "
          "tokens (lsd: long pass + short windows W=128 S=64); one torch thread per process")
    print("artifacts equal (key and every file's sha256): yes")
    for n, (ref, wall) in sorted(runs.items()):
        print(f"{n} process(es): {ref.info['tokens_per_s']:>10,.0f} document tokens/s  "
              f"{ref.info['forward_tokens_per_s']:>10,.0f} forwarded tokens/s  (wall {wall:.1f} s, "
              f"devices {ref.info['devices']})")
    ratio = many.info["tokens_per_s"] / one.info["tokens_per_s"]
    print(f"throughput {args.processes} vs 1 process: {ratio:.2f}x  (wall, launch included: "
          f"{wall1 / wall_n:.2f}x)")
    print(f"control, plain matrix products {args.processes} processes vs 1, just after: "
          f"{control:.2f}x (what the machine had free)")


if __name__ == "__main__":
    main()
