"""Benchmark of the build stage's LongRecipe path: ours (numpy) vs a per-token Python loop.

Both run the same algorithm on the same synthetic documents with the same random draws
(keep decisions, rt, gap bars), and their samples are compared token by token before any
figure is printed. Measured: walking the sentences, cutting samples, gathering tokens,
computing position ids and checking the invariants. A third line times the whole stage
(run_build: Parquet parts, coverage table, manifest) for context; it has no baseline.

    OMP_NUM_THREADS=1 python bench/bench_build.py [--samples 32] [--train-len 24000] [--target-len 80000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa

from longrecipe import ArtifactStore, BuildConfig, RuntimeConfig, StageSpec
from longrecipe.build import run_build
from longrecipe.document_stream import (
    KEEP_STREAM,
    SAMPLE_STREAM,
    DocIndex,
    Sentences,
    select_sentences,
    take_runs,
)
from longrecipe.samples import build_samples

EOS = 50_000  # above every synthetic token id


def synthetic(n_docs: int, doc_len: int, seed: int = 0):
    """Token arrays, sentence ends (mean 25 tokens) and impactful flags (about 25%)."""
    rng = np.random.default_rng(seed)
    docs, sents = [], []
    for d in range(n_docs):
        n = int(doc_len * rng.uniform(0.5, 1.5))
        docs.append(rng.integers(0, 50_000, n).astype(np.int32))
        ends = np.unique(np.minimum(np.cumsum(rng.geometric(1 / 25, n)), n))
        ends = ends[: np.searchsorted(ends, n) + 1]
        starts = np.concatenate([[0], ends[:-1]])
        sents.append((np.full(len(ends), d), starts, ends, rng.random(len(ends)) < 0.25))
    return docs, sents


# --------------------------------------------------------------------------- ours


def prepare_ours(docs, sents):
    """Inputs as run_build holds them: a document index, sentence arrays, flat tokens."""
    index = DocIndex(
        pa.array([f"d{i}" for i in range(len(docs))]),
        np.full(len(docs), "train", dtype=object),
        np.array([len(d) for d in docs], np.int64),
        np.zeros(len(docs), np.int64),
        np.arange(len(docs), dtype=np.int64),
    )
    s = Sentences(*(np.concatenate(c) for c in zip(*sents, strict=True)))
    # Each document followed by its EOS (index n_tokens of the document), as build packs them.
    flat = np.concatenate([np.append(d, EOS).astype(np.int32) for d in docs])
    base = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])[:-1]])

    def gather(doc, start, length):
        return take_runs(flat, base[doc] + start, length)

    return index, s, gather


def ours(cfg: BuildConfig, prepared, n_samples: int):
    index, s, gather = prepared
    stream = select_sentences(cfg, index, s)
    return build_samples(cfg, stream, gather, index.doc_id, 0, n_samples)


def split_batch(batch):
    L = batch.length
    return [
        (batch.input_ids[k * L : (k + 1) * L], batch.position_ids[k * L : (k + 1) * L])
        for k in range(batch.count)
    ]


# --------------------------------------------------------------------------- baseline


def prepare_baseline(docs, sents):
    """Inputs as plain Python lists."""
    return [d.tolist() for d in docs], [[x.tolist() for x in s[1:]] for s in sents]


def baseline(cfg: BuildConfig, prepared, n_samples: int):
    """The same algorithm, one token at a time in plain Python."""
    docs, sents = prepared
    L, T = cfg.train_len, cfg.target_len
    n_sent = sum(len(x[0]) for x in sents)
    u = np.random.default_rng([cfg.seed, KEEP_STREAM]).random(n_sent).tolist()
    out, ids, starts = [], [], []

    def push(token, piece_start: bool) -> bool:
        nonlocal ids, starts
        if piece_start or not ids:
            starts.append(len(ids))
        ids.append(token)
        if len(ids) == L:
            out.append((ids, _baseline_positions(cfg, len(out), starts, L, T)))
            ids, starts = [], []
        return len(out) == n_samples

    i = 0
    for d, (s_start, s_end, imp) in enumerate(sents):
        tokens = docs[d]
        kept_any = last_kept = False
        for a, b, flag in zip(s_start, s_end, imp, strict=True):
            keep = flag or u[i] < cfg.keep_ratio
            i += 1
            last_kept = keep
            if not keep:
                continue
            kept_any = True
            for t in range(a, b):
                if push(tokens[t], t == a):
                    return out
        # the EOS: glued to the last sentence when it was kept, else a piece of its own
        if kept_any and push(EOS, not last_kept):
            return out
    return out


def _baseline_positions(cfg, k, starts, L, T):
    rng = np.random.default_rng([cfg.seed, SAMPLE_STREAM, k])
    rt = int(rng.integers(1, (L + 1) // 2, endpoint=True))
    bounds = [s for s in starts if s >= rt and s > 0]
    m, total = len(bounds), T - L
    gap_at = {}
    if m:
        bars = sorted(rng.choice(total + m - 1, size=m - 1, replace=False).tolist())
        edges = [-1, *bars, total + m - 1]
        for j, s in enumerate(bounds):
            gap_at[s] = edges[j + 1] - edges[j] - 1
    pos, shift = [], 0
    for t in range(L):
        shift += gap_at.get(t, 0)
        pos.append(t + shift)
    is_start = set(starts)
    assert pos[0] == 0
    for t in range(1, L):  # the same invariants, token by token
        assert pos[t] > pos[t - 1] and pos[t] < T
        assert pos[t] == pos[t - 1] + 1 or t in is_start
    return pos


# --------------------------------------------------------------------------- stage


def stage(cfg: BuildConfig, docs, sents) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        table = pa.table(
            {
                "doc_id": [f"d{i}" for i in range(len(docs))],
                "split": ["train"] * len(docs),
                "n_tokens": pa.array([len(d) for d in docs], pa.int32()),
                "input_ids": pa.array([d.tolist() for d in docs], pa.list_(pa.int32())),
            }
        )
        def write(w):
            w.write_table("documents", table)
            w.info.update(special_tokens={"bos_token_id": None, "adds_bos": False,
                                          "eos_token_id": EOS})

        documents = store.produce(StageSpec("ingest", "bench", {}, {}), write)
        doc, start, end, imp = (np.concatenate(c) for c in zip(*sents, strict=True))
        st = pa.table(
            {"doc_id": [f"d{i}" for i in doc], "start": start, "end": end, "impactful": imp}
        )
        analysis = store.produce(
            StageSpec("analyze", "bench", {}, {"documents": documents.key}),
            lambda w: w.write_table("sentences", st),
        )
        t0 = time.perf_counter()
        ref = run_build(cfg, documents, analysis, store, RuntimeConfig(progress=False))
        return time.perf_counter() - t0, ref.info["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--train-len", type=int, default=24_000)
    ap.add_argument("--target-len", type=int, default=80_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cfg = BuildConfig(
        train_len=args.train_len, target_len=args.target_len, num_samples=args.samples
    )
    kept_share = 0.25 + 0.75 * cfg.keep_ratio
    doc_len = 20_000
    n_docs = int(args.samples * args.train_len / kept_share / doc_len * 1.3) + 2
    docs, sents = synthetic(n_docs, doc_len)
    tokens = args.samples * args.train_len
    print(
        f"synthetic: {n_docs} documents, {sum(map(len, docs)):,} tokens; "
        f"{args.samples} samples of {args.train_len:,} tokens, target {args.target_len:,}"
    )

    # Interleaved, best of `repeat` each: the machine is shared, so take each side's
    # least disturbed run.
    # Inputs are converted once, outside the timings (run_build reads them from Parquet).
    t_base = t_ours = float("inf")
    p_base, p_ours = prepare_baseline(docs, sents), prepare_ours(docs, sents)
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        ref = baseline(cfg, p_base, args.samples)
        t_base = min(t_base, time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = split_batch(ours(cfg, p_ours, args.samples))
        t_ours = min(t_ours, time.perf_counter() - t0)
    assert len(ref) == len(got) == args.samples
    for k, ((a_ids, a_pos), (b_ids, b_pos)) in enumerate(zip(ref, got, strict=True)):
        assert np.array_equal(a_ids, b_ids) and np.array_equal(a_pos, b_pos), f"sample {k} differs"
    print("outputs identical: yes")
    print(
        f"per-token Python : {tokens / t_base:>14,.0f} tokens/s  ({t_base:.3f} s, best of {args.repeat})"
    )
    print(
        f"numpy (ours)     : {tokens / t_ours:>14,.0f} tokens/s  ({t_ours:.3f} s, best of {args.repeat})"
    )
    print(f"speed-up         : {t_base / t_ours:.1f}x")
    secs, n = stage(cfg, docs, sents)
    print(
        f"whole stage      : {n / secs:>14,.0f} tokens/s  ({secs:.3f} s: run_build incl. Parquet, coverage, manifest)"
    )


if __name__ == "__main__":
    main()
