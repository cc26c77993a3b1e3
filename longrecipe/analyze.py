"""Impactful-token analysis: score every token of the training documents, decide which
token types, tokens and sentences are impactful, and write three tables
(longrecipe.analysis_tables; docs/analyze.md sets the paper's analysis beside ours).

Methods (AnalyzeConfig.method):

- `logit_delta` (the paper): score = log p under a reference long-context model H'
  minus log p under the base model H, same text, same long pass. The reference is
  the base model after a short long-context training made in the same DAG
  (`reference_training`, as the paper), another local model, or the base model
  with a RoPE change. Selection by token type (the paper): the top 20% of types by
  their mean score over the corpus.
- `lsd` (LongPPL, one model): score = log p(token | long context) minus
  log p(token | the last W tokens only). Selection by occurrence: LSD > alpha and
  the long log-prob > beta (LongPPL's key tokens), or the top fraction.
- `digits` (the public code's heuristic, for comparison): a token is flagged when
  its decoded text holds a digit, a sentence when one of its tokens is.

Sentences are then flagged by their share of impactful tokens: the top
`sentence_fraction` of them (longrecipe.selection).

Order of work, so that a killed run resumes (each step is deterministic):
1. per shard of `shard_docs` documents: the scores, written as the shard's
   `token_scores` part (its done-marker; finished shards are skipped). With
   `num_processes` N (under `accelerate launch`, longrecipe.launch) each process
   scores its share of the shards (`assign_shares`: the same plan in every process)
   on its own device; steps 2-4 run in process 0 once every share is done;
2. the corpus-wide type statistic, from every token_scores part;
3. every sentence's count of impactful tokens, and the sentence flags;
4. per shard: `token_scores` rewritten with the type flags (unit=type), then the
   `sentences` part (the done-marker of this step); then `token_stats`.
The artifact is the same (key and tables) for any number of processes, and a run
killed half-way resumes with any number, reusing every finished part.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from longrecipe.analysis_tables import (
    DocReader,
    sentences_table,
    token_scores_table,
    token_stats_table,
    with_flags,
)
from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import AnalyzeConfig, ModelSpec, RuntimeConfig, config_digest
from longrecipe.launch import (
    Job,
    assign_shares,
    launch,
    process_runtime,
    produce,
    rank_and_world,
    resolve_processes,
)
from longrecipe.models import ModelSource, load_tokenizer, resolve
from longrecipe.progress import progress_bar
from longrecipe.scoring import AnalyzeError, Scorer, rope_reference
from longrecipe.selection import (
    TypeStats,
    flag_sentences,
    impactful_types,
    select_impactful,
    sentence_counts,
)
from longrecipe.tokens import token_policy

STAGE = "analyze"
STAGE_VERSION = "analyze_v2"  # v2: type-level selection, sentence_fraction, categories
WARN_FLAGGED_ABOVE = 0.9
"""Above this share of flagged sentences the selection barely selects: the stage warns."""
log = logging.getLogger("longrecipe")

__all__ = [
    "STAGE", "STAGE_VERSION", "AnalyzeError", "analyze_spec", "rope_reference",
    "run_analyze", "run_reference_training", "select_impactful",
]


def analyze_spec(
    cfg: AnalyzeConfig,
    documents: ArtifactRef,
    model: ModelSource,
    reference: ModelSource | None = None,
) -> StageSpec:
    inputs = {"documents": documents.key, "model": model.key}
    if reference is not None:
        inputs["reference"] = reference.key
    return StageSpec(STAGE, STAGE_VERSION, config_digest(cfg), inputs)


def reference_source(
    cfg: AnalyzeConfig, reference: ModelSource | ArtifactRef | ModelSpec | None = None
) -> ModelSource | None:
    """The logit_delta reference as a model source: the trained H' passed in
    (reference_training), cfg.reference, or None (the base with cfg.reference_rope)."""
    if cfg.method != "logit_delta":
        return None
    if cfg.reference_training is not None:
        if reference is None:
            raise AnalyzeError(
                "analyze.reference_training: the trained reference model was not given; run "
                "run_reference_training(cfg, documents, model, store) first and pass its "
                "artifact as `reference` (the pipeline flow does this)"
            )
        return reference if isinstance(reference, ModelSource) else resolve(reference)
    if reference is not None:
        raise AnalyzeError(
            "a reference model was passed, but analyze.reference_training is not set: "
            "configure the reference in analyze (reference, reference_rope or "
            "reference_training) so that it enters the key"
        )
    return resolve(cfg.reference) if cfg.reference is not None else None


def run_reference_training(
    cfg: AnalyzeConfig,
    documents: ArtifactRef,
    model: ModelSpec | ModelSource,
    store: ArtifactStore,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> ArtifactRef:
    """H' of the paper: build `cfg.reference_training.build` samples from the documents and
    train the base model on them (two ordinary, cached stages). Returns the train artifact,
    the `reference` of run_analyze."""
    from longrecipe.build import run_build
    from longrecipe.train import run_train

    if cfg.reference_training is None:
        raise AnalyzeError("analyze.reference_training is not set: there is nothing to train")
    rt = cfg.reference_training
    samples = run_build(rt.build, documents, None, store, runtime)
    return run_train(rt.train, samples, model, store, runtime)


def run_analyze(
    cfg: AnalyzeConfig,
    documents: ArtifactRef,
    model: ModelSpec | ModelSource,
    store: ArtifactStore,
    runtime: RuntimeConfig = RuntimeConfig(),
    reference: ModelSource | ArtifactRef | None = None,
) -> ArtifactRef:
    """Score the training documents with `cfg.method` and write token_scores, sentences and
    token_stats. The logit_delta reference is `reference` (the model of
    run_reference_training, when cfg.reference_training is set), cfg.reference, or the
    base model with cfg.reference_rope. With cfg.num_processes > 1 (or an accelerate
    config) the stage runs under `accelerate launch`, each process scoring its share."""
    return _run_analyze(cfg, documents, model, store, runtime, reference, job=None)


def run_launched(job: Job) -> ArtifactRef:
    """One process of a launched analysis (longrecipe.launched's entry)."""
    cfg = AnalyzeConfig.model_validate(job.config)
    return _run_analyze(cfg, job.inputs["documents"], job.inputs["model"], job.store,
                        process_runtime(job.runtime), job.inputs.get("reference"), job=job)


def _run_analyze(cfg, documents, model, store, runtime, reference, *, job: Job | None) -> ArtifactRef:
    src = model if isinstance(model, ModelSource) else resolve(model)
    ref_src = reference_source(cfg, reference)
    spec = analyze_spec(cfg, documents, src, ref_src)
    if job is None and ((cfg.num_processes or 1) > 1 or cfg.accelerate_config is not None):
        inputs = {"documents": documents, "model": src,
                  **({"reference": ref_src} if ref_src is not None else {})}
        return launch(spec, cfg, inputs, store, runtime,
                      processes=resolve_processes(cfg.num_processes, cfg.accelerate_config),
                      accelerate_config=cfg.accelerate_config, mixed_precision="no")
    reader = DocReader(documents)
    shards = reader.plan(cfg.shard_docs, cfg.max_documents)
    rank, world = rank_and_world() if job is not None else (0, 1)
    started = time.perf_counter()
    held: dict = {}  # what process 0's finish reuses from its own step 1

    def score_my_shards(w: StageWriter) -> dict:
        """Step 1, this process's share of the shards (all of them in one process)."""
        t0 = time.perf_counter()
        tok = held["tok"] = load_tokenizer(src)
        tok_seconds = time.perf_counter() - t0
        scorer = Scorer(cfg, src, ref_src, runtime, tok)
        cost = [scorer.forward_tokens(reader.lengths(s)) or len(s) for s in shards]
        owner = assign_shares(cost, world)
        timing = _score_shards(w, reader, shards, [i for i in range(len(shards)) if owner[i] == rank],
                               scorer, runtime)
        held["load_seconds"] = tok_seconds + scorer.load_seconds
        return timing

    def finish(w: StageWriter, shares: list[dict]) -> None:
        """Steps 2-4, once every shard is scored: they need the whole corpus."""
        tok = held["tok"]
        stats, facts = _aggregate(w, reader, shards)
        unit = cfg.effective_unit
        type_flags, type_facts = (None, None) if unit == "digits" else impactful_types(stats, cfg)
        flagged, n_imp_type = _flag_sentences(w, cfg, reader, shards, type_flags, unit)
        for i, shard in enumerate(shards):
            if w.has_part("sentences", i):
                continue
            docs = reader.read(shard)
            part = w.read_part("token_scores", i)
            flags = _token_flags(part, docs, type_flags, unit)
            if unit == "type":
                part = with_flags(part, flags)
                w.write_part("token_scores", i, part)
            # sentences is this step's done-marker, so it is written last.
            w.write_part("sentences", i, sentences_table(docs, part, flags, flagged[i], tok))
        w.write_table("token_stats", token_stats_table(stats, n_imp_type, type_flags, tok))
        n_imp_tokens = int(n_imp_type.sum())
        n_sent = sum(len(f) for f in flagged)
        n_flagged = int(sum(int(f.sum()) for f in flagged))
        share = round(n_flagged / n_sent, 6) if n_sent else None
        warnings = []
        if share is not None and share > WARN_FLAGGED_ABOVE:
            warnings.append(
                f"{100 * share:.1f}% of the sentences are flagged impactful: build keeps them "
                "all, so keep_ratio barely matters (lower analyze.sentence_fraction)"
            )
            log.warning("analyze: %s", warnings[-1])
        w.info.update(
            method=cfg.method,
            unit=unit,
            selection=cfg.effective_selection,
            thresholds=_thresholds(cfg),
            types=type_facts,
            impactful_tokens=n_imp_tokens,
            impactful_fraction=(round(n_imp_tokens / facts["tokens"], 6)
                                if facts["tokens"] else None),
            sentence_fraction=cfg.sentence_fraction if unit != "digits" else None,
            sentences=n_sent,
            sentences_flagged=n_flagged,
            sentences_flagged_fraction=share,
            warnings=warnings,
            special_tokens=token_policy(tok).as_info(),
            model=src.key,
            model_source=src.spec.source,
            reference=ref_src.key if ref_src else None,
            reference_source=ref_src.spec.source if ref_src else None,
            reference_rope=cfg.reference_rope,
            reference_training=ref_src.key if cfg.reference_training is not None else None,
            shards=len(shards),
            seconds=round(time.perf_counter() - started, 3),
            load_seconds=round(held["load_seconds"], 3),
            short_context=(
                [cfg.short_window - cfg.short_stride + 1, cfg.short_window]
                if cfg.method == "lsd" else None
            ),
            **_timing(shares),
            **facts,
        )

    return produce(store, spec, score_my_shards, job, finish=finish)


# --------------------------------------------------------------------------- steps


def _score_shards(w: StageWriter, reader: DocReader, shards: list, mine: list[int],
                  scorer: Scorer, runtime: RuntimeConfig) -> dict:
    """Step 1: score the shards of `mine` not finished yet, one token_scores part each."""
    pending = [i for i in mine if not w.has_part("token_scores", i)]
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
            w.write_part("token_scores", i, token_scores_table(docs, scores))
    return dict(shards_computed=len(pending), tokens_computed=n_computed, forward_tokens=total,
                compute_seconds=compute_s, device=scorer.device if pending else runtime.device)


def _timing(shares: list[dict]) -> dict:
    """Step 1's figures, all processes together: throughput is the tokens they computed
    over the slowest one's compute time (what the processes achieved side by side)."""
    slowest = max(s["compute_seconds"] for s in shares)
    computed = sum(s["tokens_computed"] for s in shares)
    forward = sum(s["forward_tokens"] for s in shares)
    return dict(
        processes=len(shares),
        devices=[s["device"] for s in shares],
        shards_computed=sum(s["shards_computed"] for s in shares),
        tokens_computed=computed,
        forward_tokens=forward,
        tokens_per_s=round(computed / slowest, 1) if slowest else None,
        forward_tokens_per_s=round(forward / slowest, 1) if slowest else None,
    )


def _aggregate(w: StageWriter, reader: DocReader, shards: list[list]) -> tuple[TypeStats, dict]:
    """Step 2: per token id over every part (also the resumed ones), plus context facts."""
    stats = TypeStats()
    ctx_n = ctx_sum = trunc_n = 0
    ctx_min_trunc = None
    for i, shard in enumerate(shards):
        part = w.read_part("token_scores", i)
        docs = reader.read(shard)
        if part.column("doc_id").to_pylist() != [d.doc_id for d in docs]:
            raise AnalyzeError(f"analyze part {i} does not match the documents it was made from")
        ids = np.concatenate([d.ids for d in docs]).astype(np.int64)
        score = _flat(part, "score").astype(np.float32)
        lp_col = part.column("logprob")
        logprob = _flat(part, "logprob") if lp_col.null_count < len(lp_col) else None
        stats.add(ids, score, logprob)
        ctx_col = part.column("context")
        if ctx_col.null_count < len(ctx_col):
            ctx = _flat(part, "context")
            pos = np.concatenate([np.arange(len(d.ids)) for d in docs])
            scored = ctx > 0
            ctx_n += int(scored.sum())
            ctx_sum += int(ctx[scored].sum())
            trunc = scored & (ctx < pos)
            trunc_n += int(trunc.sum())
            if trunc.any():
                m = int(ctx[trunc].min())
                ctx_min_trunc = m if ctx_min_trunc is None else min(ctx_min_trunc, m)
    total = int(stats.count.sum())
    facts = {
        "documents": sum(len(s) for s in shards),
        "tokens": total,
        "tokens_scored": int(stats.n_scored.sum()),
        "context_mean": round(ctx_sum / ctx_n, 2) if ctx_n else None,
        "context_min_truncated": ctx_min_trunc,
        "truncated_fraction": round(trunc_n / ctx_n, 6) if ctx_n else None,
    }
    return stats, facts


def _flag_sentences(w: StageWriter, cfg: AnalyzeConfig, reader: DocReader, shards: list,
                    type_flags: np.ndarray | None, unit: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Step 3: each shard's sentence flags (by rank over the whole corpus) and the number
    of impactful occurrences of each token id."""
    n_imp, n_tok, per_shard = [], [], []
    imp_per_id = np.zeros(0, np.int64)
    for i, shard in enumerate(shards):
        docs = reader.read(shard)
        part = None if unit == "type" else w.read_part("token_scores", i)
        flags = _token_flags(part, docs, type_flags, unit)
        count = 0
        for d, f in zip(docs, flags, strict=True):
            n_imp.append(sentence_counts(f, d.ends))
            n_tok.append(np.diff(d.ends, prepend=0))
            count += len(d.ends)
            hit = d.ids[f].astype(np.int64)
            if len(hit):
                size = max(len(imp_per_id), int(hit.max()) + 1)
                imp_per_id = np.pad(imp_per_id, (0, size - len(imp_per_id)))
                imp_per_id += np.bincount(hit, minlength=size)
        per_shard.append(count)
    n_imp_all = np.concatenate(n_imp) if n_imp else np.zeros(0, np.int64)
    n_tok_all = np.concatenate(n_tok) if n_tok else np.zeros(0, np.int64)
    if unit == "digits":
        flagged = n_imp_all > 0  # the public code's rule: the sentence holds a digit
    else:
        flagged = flag_sentences(n_imp_all, n_tok_all, cfg.sentence_fraction)
    bounds = np.cumsum([0, *per_shard])
    return [flagged[bounds[i] : bounds[i + 1]] for i in range(len(shards))], imp_per_id


def _token_flags(part: pa.Table | None, docs: list, type_flags: np.ndarray | None,
                 unit: str) -> list[np.ndarray]:
    """Each document's impactful tokens: its tokens of impactful types (unit=type), else the
    flags step 1 stored (per occurrence, or digits)."""
    if unit == "type":
        assert type_flags is not None
        return [type_flags[d.ids] if len(d.ids) else np.zeros(0, bool) for d in docs]
    assert part is not None
    return [np.asarray(f, bool) for f in part.column("impactful").to_pylist()]


def _flat(part: pa.Table, column: str) -> np.ndarray:
    return pc.list_flatten(part.column(column)).to_numpy(zero_copy_only=False)


def _thresholds(cfg: AnalyzeConfig) -> dict:
    sel = cfg.effective_selection
    if sel == "top_fraction":
        return {"top_fraction": cfg.top_fraction}
    if sel == "threshold":
        if cfg.method == "lsd":
            return {"lsd_alpha": cfg.lsd_alpha, "lsd_beta": cfg.lsd_beta}
        return {"threshold": cfg.threshold}
    return {"rule": "digit in decoded text"}
