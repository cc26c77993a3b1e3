"""Impactful-token analysis: score every token of the training documents, flag the
impactful ones, and write three tables.

Methods (AnalyzeConfig.method):

- `lsd` (LongPPL, one model): score = log p(token | long context) minus
  log p(token | the last W tokens only). Impactful when LSD > alpha and the
  long log-prob > beta, or the top fraction of each document.
- `logit_delta` (the paper): score = log p under a reference long-context
  model minus log p under the base model, same text, same long pass. The
  reference is another local model or the base model with a RoPE change.
  Impactful: the top fraction of each document (paper: 20%), or a threshold.
- `digits` (the public code's heuristic, for comparison): a token is flagged
  when its decoded text holds a digit, a sentence when its text does.

Tables (one part per shard of `shard_docs` training documents; a rerun skips
finished shards):

- token_scores: per document, lists aligned with documents.input_ids.
- sentences: per sentence (from documents.sentence_ends): start, end, counts.
- token_stats: per token id over the whole run (written last, one part).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import AnalyzeConfig, ModelSpec, RopeConfig, RuntimeConfig
from longrecipe.errors import InputError
from longrecipe.models import ModelSource, load_model, load_tokenizer, pick_device, resolve
from longrecipe.progress import progress_bar

STAGE = "analyze"
STAGE_VERSION = "analyze_v1"

TOKEN_SCORES_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("n_tokens", pa.int32()),
        ("logprob", pa.list_(pa.float32())),
        ("logprob_ref", pa.list_(pa.float32())),
        ("logprob_short", pa.list_(pa.float32())),
        ("score", pa.list_(pa.float32())),
        ("impactful", pa.list_(pa.bool_())),
        ("context", pa.list_(pa.int32())),
    ]
)

SENTENCES_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("sentence_index", pa.int32()),
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("n_tokens", pa.int32()),
        ("n_impactful", pa.int32()),
        ("max_score", pa.float32()),
        ("impactful", pa.bool_()),
        ("text", pa.large_string()),
    ]
)

TOKEN_STATS_SCHEMA = pa.schema(
    [
        ("token_id", pa.int32()),
        ("token", pa.string()),
        ("count", pa.int64()),
        ("n", pa.int64()),
        ("n_scored", pa.int64()),
        ("n_impactful", pa.int64()),
        ("mean_score", pa.float64()),
        ("impactful_rate", pa.float64()),
    ]
)


class AnalyzeError(InputError):
    """Bad input to the analysis (documents, models); the message names the document or field."""


@dataclass(frozen=True)
class Doc:
    """One training document as the analysis reads it."""

    doc_id: str
    ids: np.ndarray
    ends: np.ndarray


@dataclass(frozen=True)
class Scores:
    """Per-token results for one document (arrays aligned with its input_ids)."""

    logprob: np.ndarray | None
    logprob_ref: np.ndarray | None
    logprob_short: np.ndarray | None
    score: np.ndarray
    impactful: np.ndarray
    context: np.ndarray | None


def analyze_spec(
    cfg: AnalyzeConfig,
    documents: ArtifactRef,
    model: ModelSource,
    reference: ModelSource | None = None,
) -> StageSpec:
    inputs = {"documents": documents.key, "model": model.key}
    if reference is not None:
        inputs["reference"] = reference.key
    return StageSpec(STAGE, STAGE_VERSION, cfg, inputs)


def run_analyze(
    cfg: AnalyzeConfig,
    documents: ArtifactRef,
    model: ModelSpec | ModelSource,
    store: ArtifactStore,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> ArtifactRef:
    """Score the training documents with `cfg.method` and write token_scores, sentences and
    token_stats. The reference model (logit_delta) comes from cfg.reference or
    cfg.reference_rope."""
    src = model if isinstance(model, ModelSource) else resolve(model)
    ref_src = resolve(cfg.reference) if cfg.method == "logit_delta" and cfg.reference else None
    reader = _DocReader(documents)
    shards = reader.plan(cfg.shard_docs, cfg.max_documents)

    def body(w: StageWriter) -> None:
        started = time.perf_counter()
        tok = load_tokenizer(src)
        tok_seconds = time.perf_counter() - started
        scorer = _Scorer(cfg, src, ref_src, runtime, tok)
        pending = [i for i in range(len(shards)) if not w.has_part("token_scores", i)]
        total = sum(scorer.forward_tokens(reader.lengths(shards[i])) for i in pending)
        n_computed, compute_s = 0, 0.0
        if pending:
            scorer.load()
        with progress_bar("analyze", runtime.progress, unit="tok", total=total or None) as bar:
            for i in pending:
                docs = reader.read(shards[i])
                bar.note(f"shard {i + 1}/{len(shards)}")
                t0 = time.perf_counter()
                scores = scorer.score(docs, bar.advance)
                compute_s += time.perf_counter() - t0
                n_computed += sum(len(d.ids) for d in docs)
                # token_scores is the shard's done-marker, so it is written last.
                w.write_part("sentences", i, sentences_table(docs, scores, tok, cfg.method))
                w.write_part("token_scores", i, token_scores_table(docs, scores))
        stats, facts = _aggregate(w, reader, shards, tok)
        w.write_table("token_stats", stats)
        w.info.update(
            method=cfg.method,
            selection=cfg.effective_selection,
            thresholds=_thresholds(cfg),
            model=src.key,
            model_source=src.spec.source,
            reference=ref_src.key if ref_src else None,
            reference_source=ref_src.spec.source if ref_src else None,
            reference_rope=cfg.reference_rope,
            shards=len(shards),
            shards_computed=len(pending),
            tokens_computed=n_computed,
            forward_tokens=total,
            tokens_per_s=round(n_computed / compute_s, 1) if compute_s else None,
            forward_tokens_per_s=round(total / compute_s, 1) if compute_s else None,
            seconds=round(time.perf_counter() - started, 3),
            load_seconds=round(tok_seconds + scorer.load_seconds, 3),
            short_context=(
                [cfg.short_window - cfg.short_stride + 1, cfg.short_window]
                if cfg.method == "lsd" else None
            ),
            **facts,
        )

    return store.produce(analyze_spec(cfg, documents, src, ref_src), body)


# --------------------------------------------------------------------------- scoring


class _Scorer:
    """Scores shards; `load` is called only when a shard is pending (a rerun with every
    shard done loads no model)."""

    def __init__(self, cfg: AnalyzeConfig, src: ModelSource, ref_src: ModelSource | None,
                 runtime: RuntimeConfig, tok):
        self.cfg, self.src, self.ref_src, self.runtime, self.tok = cfg, src, ref_src, runtime, tok
        self.base = self.reference = None
        self.load_seconds = 0.0
        self.device = "cpu"
        self._digit: dict[int, bool] = {}

    def forward_tokens(self, lengths: list[int]) -> int:
        """Tokens the passes of a shard forward (the progress bar's unit)."""
        from longrecipe.logprobs import long_windows, short_windows, window_tokens

        cfg = self.cfg
        if cfg.method == "digits":
            return 0
        long = sum(window_tokens(long_windows(0, n, cfg.max_context, cfg.long_min_context))
                   for n in lengths)
        if cfg.method == "logit_delta":
            return 2 * long
        return long + sum(
            window_tokens(short_windows(0, n, cfg.short_window, cfg.short_stride)) for n in lengths
        )

    def load(self) -> None:
        """Load the model(s) the method needs (none for digits)."""
        if self.cfg.method == "digits" or self.base is not None:
            return
        import torch

        t0 = time.perf_counter()
        if self.runtime.threads:
            torch.set_num_threads(self.runtime.threads)
        self.device = pick_device(self.runtime.device)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.base = load_model(self.src, dtype=dtype, device=self.device)
        if self.cfg.method == "logit_delta":
            if self.ref_src is not None:
                if load_tokenizer(self.ref_src).get_vocab() != self.tok.get_vocab():
                    raise AnalyzeError(
                        f"analyze.reference {self.ref_src.spec.source!r}: its tokenizer differs "
                        f"from the base model's {self.src.spec.source!r}; logit_delta compares "
                        "the same tokens under both"
                    )
                self.reference = load_model(self.ref_src, dtype=dtype, device=self.device)
            else:
                self.reference = rope_reference(
                    load_model(self.src, dtype=dtype, device=self.device), self.cfg.reference_rope
                )
        self.load_seconds = time.perf_counter() - t0

    def score(self, docs: list[Doc], advance) -> list[Scores]:
        cfg = self.cfg
        if cfg.method == "digits":
            return [self._digits(d) for d in docs]
        from longrecipe.logprobs import long_windows, score_windows, short_windows

        vocab = self.base.config.vocab_size
        for d in docs:
            if len(d.ids) and int(d.ids.max()) >= vocab:
                raise AnalyzeError(
                    f"document {d.doc_id}: token id {int(d.ids.max())} is outside the model's "
                    f"vocabulary ({vocab}); were the documents ingested with another tokenizer?"
                )
        ids, k = [d.ids for d in docs], len(docs)
        long_ws = [
            w
            for i, d in enumerate(docs)
            for w in long_windows(i, len(d.ids), cfg.max_context, cfg.long_min_context)
        ]
        run = dict(batch_tokens=cfg.batch_tokens, device=self.device, on_batch=advance)
        out = []
        if cfg.method == "lsd":
            # One batched run for both passes: short windows address documents k..2k-1.
            short_ws = [
                w
                for i, d in enumerate(docs)
                for w in short_windows(i + k, len(d.ids), cfg.short_window, cfg.short_stride)
            ]
            lp, ctx = score_windows(self.base, ids + ids, long_ws + short_ws, **run)
            for i in range(k):
                long = lp[i]
                # Targets within the first W tokens see their whole prefix in a short window too.
                short = np.where(ctx[i + k] >= 0, lp[i + k], long).astype(np.float32)
                score = (long - short).astype(np.float32)
                flags = select_impactful(score, long, cfg)
                out.append(Scores(long, None, short, score, flags, _context(ctx[i])))
            return out
        lp, ctx = score_windows(self.base, ids, long_ws, **run)
        lp_ref, _ = score_windows(self.reference, ids, long_ws, **run)
        for i in range(k):
            score = (lp_ref[i] - lp[i]).astype(np.float32)
            flags = select_impactful(score, lp[i], cfg)
            out.append(Scores(lp[i], lp_ref[i], None, score, flags, _context(ctx[i])))
        return out

    def _digits(self, d: Doc) -> Scores:
        flags = np.fromiter((self._has_digit(int(t)) for t in d.ids), dtype=bool, count=len(d.ids))
        return Scores(None, None, None, flags.astype(np.float32), flags, None)

    def _has_digit(self, tid: int) -> bool:
        hit = self._digit.get(tid)
        if hit is None:
            hit = self._digit[tid] = has_digit(self.tok.decode([tid]))
        return hit


def _context(context: np.ndarray) -> np.ndarray:
    # Token 0 is never scored: it had no context at all.
    return np.maximum(context, 0)


def select_impactful(
    score: np.ndarray, logprob: np.ndarray | None, cfg: AnalyzeConfig
) -> np.ndarray:
    """Flag impactful tokens of one document from its scores (NaN scores are never flagged).

    top_fraction: the ceil(top_fraction x scored tokens) highest scores (ties: earliest first).
    threshold: lsd -> score > lsd_alpha and logprob > lsd_beta; logit_delta -> score > threshold.
    """
    sel = cfg.effective_selection
    valid = np.isfinite(score)
    if sel == "top_fraction":
        out = np.zeros(len(score), dtype=bool)
        idx = np.flatnonzero(valid)
        k = math.ceil(cfg.top_fraction * len(idx))
        if k:
            order = np.argsort(-score[idx], kind="stable")[:k]
            out[idx[order]] = True
        return out
    if sel == "threshold":
        with np.errstate(invalid="ignore"):
            if cfg.method == "lsd":
                return valid & (score > cfg.lsd_alpha) & (logprob > cfg.lsd_beta)
            return valid & (score > cfg.threshold)
    raise ValueError(f"select_impactful: method {cfg.method!r} selects by digits, not scores")


def has_digit(text: str) -> bool:
    """The public code's rule: does the decoded text hold a digit?"""
    return any(c.isdigit() for c in text)


def rope_reference(model, rope: RopeConfig):
    """The base model turned into the logit_delta reference by a RoPE change (in place):
    longrecipe.rope sets `rope_parameters` and rebuilds the rotary modules; a scaled RoPE
    also gets its window raised to original x factor."""
    from longrecipe.rope import apply_rope

    target = None
    if rope.type != "default" and rope.factor is not None:
        params = getattr(model.config, "rope_parameters", None) or {}
        original = (rope.original_max_position_embeddings
                    or params.get("original_max_position_embeddings")
                    or model.config.max_position_embeddings)
        target = int(original * rope.factor)
    apply_rope(model, rope, target, training=False)
    return model


# --------------------------------------------------------------------------- tables


def token_scores_table(docs: list[Doc], scores: list[Scores]) -> pa.Table:
    def col(name: str, typ) -> pa.Array:
        vals = [getattr(s, name) for s in scores]
        return pa.array([None if v is None else v.tolist() for v in vals], pa.list_(typ))

    return pa.Table.from_arrays(
        [
            pa.array([d.doc_id for d in docs], pa.string()),
            pa.array([len(d.ids) for d in docs], pa.int32()),
            col("logprob", pa.float32()),
            col("logprob_ref", pa.float32()),
            col("logprob_short", pa.float32()),
            col("score", pa.float32()),
            col("impactful", pa.bool_()),
            col("context", pa.int32()),
        ],
        schema=TOKEN_SCORES_SCHEMA,
    )


def sentences_table(docs: list[Doc], scores: list[Scores], tok, method: str) -> pa.Table:
    rows: dict[str, list] = {f.name: [] for f in SENTENCES_SCHEMA}
    for d, s in zip(docs, scores, strict=True):
        start = 0
        for j, end in enumerate(d.ends.tolist()):
            text = tok.decode(d.ids[start:end].tolist())
            flags, sc = s.impactful[start:end], s.score[start:end]
            finite = sc[np.isfinite(sc)]
            n_imp = int(flags.sum())
            rows["doc_id"].append(d.doc_id)
            rows["sentence_index"].append(j)
            rows["start"].append(start)
            rows["end"].append(end)
            rows["n_tokens"].append(end - start)
            rows["n_impactful"].append(n_imp)
            rows["max_score"].append(float(finite.max()) if len(finite) else None)
            rows["impactful"].append(has_digit(text) if method == "digits" else n_imp > 0)
            rows["text"].append(text)
            start = end
    return pa.Table.from_pydict(rows, schema=SENTENCES_SCHEMA)


def _aggregate(
    w: StageWriter, reader: _DocReader, shards: list[list], tok
) -> tuple[pa.Table, dict]:
    """token_stats over every part (also the resumed ones), plus context facts for the manifest."""
    size = 0
    count = np.zeros(0, np.int64)
    n_scored = np.zeros(0, np.int64)
    n_imp = np.zeros(0, np.int64)
    score_sum = np.zeros(0, np.float64)
    ctx_n = ctx_sum = trunc_n = 0
    ctx_min_trunc = None
    for i, shard in enumerate(shards):
        part = w.read_part("token_scores", i)
        docs = reader.read(shard)
        if part.column("doc_id").to_pylist() != [d.doc_id for d in docs]:
            raise AnalyzeError(f"analyze part {i} does not match the documents it was made from")
        ids = np.concatenate([d.ids for d in docs]).astype(np.int64)
        score = pc.list_flatten(part.column("score")).to_numpy(zero_copy_only=False)
        flags = pc.list_flatten(part.column("impactful")).to_numpy(zero_copy_only=False)
        if len(ids):
            size = max(size, int(ids.max()) + 1)
        count, n_scored, n_imp, score_sum = (np.pad(a, (0, size - len(a)))
                                             for a in (count, n_scored, n_imp, score_sum))
        ok = np.isfinite(score)
        count += np.bincount(ids, minlength=size)
        n_scored += np.bincount(ids[ok], minlength=size)
        n_imp += np.bincount(ids[flags.astype(bool)], minlength=size)
        score_sum += np.bincount(ids[ok], weights=score[ok].astype(np.float64), minlength=size)
        ctx_col = part.column("context")
        if ctx_col.null_count < len(ctx_col):
            ctx = pc.list_flatten(ctx_col).to_numpy(zero_copy_only=False)
            pos = np.concatenate([np.arange(len(d.ids)) for d in docs])
            scored = ctx > 0
            ctx_n += int(scored.sum())
            ctx_sum += int(ctx[scored].sum())
            trunc = scored & (ctx < pos)
            trunc_n += int(trunc.sum())
            if trunc.any():
                m = int(ctx[trunc].min())
                ctx_min_trunc = m if ctx_min_trunc is None else min(ctx_min_trunc, m)
    present = np.flatnonzero(count)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_scored[present] > 0, score_sum[present] / n_scored[present], np.nan)
    stats = pa.Table.from_arrays(
        [
            pa.array(present, pa.int32()),
            pa.array([tok.decode([int(t)]) for t in present], pa.string()),
            pa.array(count[present], pa.int64()),
            pa.array(count[present], pa.int64()),
            pa.array(n_scored[present], pa.int64()),
            pa.array(n_imp[present], pa.int64()),
            pa.array(mean, pa.float64()),
            pa.array(n_imp[present] / count[present], pa.float64()),
        ],
        schema=TOKEN_STATS_SCHEMA,
    )
    total = int(count.sum())
    facts = {
        "documents": sum(len(s) for s in shards),
        "tokens": total,
        "tokens_scored": int(n_scored.sum()),
        "impactful_tokens": int(n_imp.sum()),
        "impactful_fraction": round(int(n_imp.sum()) / total, 6) if total else None,
        "context_mean": round(ctx_sum / ctx_n, 2) if ctx_n else None,
        "context_min_truncated": ctx_min_trunc,
        "truncated_fraction": round(trunc_n / ctx_n, 6) if ctx_n else None,
    }
    return stats, facts


def _thresholds(cfg: AnalyzeConfig) -> dict:
    sel = cfg.effective_selection
    if sel == "top_fraction":
        return {"top_fraction": cfg.top_fraction}
    if sel == "threshold":
        if cfg.method == "lsd":
            return {"lsd_alpha": cfg.lsd_alpha, "lsd_beta": cfg.lsd_beta}
        return {"threshold": cfg.threshold}
    return {"rule": "digit in decoded text"}


# --------------------------------------------------------------------------- documents


class _DocReader:
    """Training documents of a `documents` artifact, read part by part (one part cached)."""

    def __init__(self, documents: ArtifactRef):
        self.ref = documents
        self._cached: tuple[int, pa.Table] | None = None
        self._n: dict[tuple[int, int], int] = {}

    def plan(self, shard_docs: int, max_documents: int | None) -> list[list[tuple[int, int]]]:
        """Shards of (part, row) addresses of the training documents, in document order."""
        addrs: list[tuple[int, int]] = []
        for p, part in enumerate(self.ref.iter_parts("documents", columns=["split", "n_tokens"])):
            splits = part.column("split").to_pylist()
            lengths = part.column("n_tokens").to_pylist()
            for r, (split, n) in enumerate(zip(splits, lengths, strict=True)):
                if split == "train" and (max_documents is None or len(addrs) < max_documents):
                    addrs.append((p, r))
                    self._n[(p, r)] = n
        if not addrs:
            raise AnalyzeError(
                f"documents/{self.ref.key} holds no document with split 'train' to analyse"
            )
        return [addrs[i : i + shard_docs] for i in range(0, len(addrs), shard_docs)]

    def lengths(self, shard: list[tuple[int, int]]) -> list[int]:
        return [self._n[a] for a in shard]

    def read(self, shard: list[tuple[int, int]]) -> list[Doc]:
        out = []
        for p, r in shard:
            part = self._part(p)
            doc_id = part.column("doc_id")[r].as_py()
            ids = np.asarray(part.column("input_ids")[r].values.to_numpy(zero_copy_only=False))
            ends = np.asarray(part.column("sentence_ends")[r].values.to_numpy(zero_copy_only=False))
            if len(ids) and (len(ends) == 0 or ends[-1] != len(ids) or np.any(np.diff(ends) <= 0)):
                raise AnalyzeError(
                    f"documents/{self.ref.key} document {doc_id}: sentence_ends must increase and "
                    f"end at n_tokens ({len(ids)})"
                )
            out.append(Doc(doc_id, ids.astype(np.int32), ends.astype(np.int64)))
        return out

    def _part(self, p: int) -> pa.Table:
        if self._cached is None or self._cached[0] != p:
            files = self.ref.files("documents")
            table = pq.read_table(
                files[p], columns=["doc_id", "input_ids", "sentence_ends"], filesystem=self.ref.fs
            )
            self._cached = (p, table)
        return self._cached[1]
