"""The build stage: token sequences with the position ids they are trained at.

Reads `documents` (and, for LongRecipe, the analysis `sentences`), writes
`samples` in resumable parts and a small `coverage` table.

How a sample is made. The documents of the chosen split, in artifact order,
form one stream of pieces (longrecipe.document_stream): whole documents for
full/randomized/pose, the kept sentences for longrecipe (every sentence with an
impactful token, each other one with probability keep_ratio), each document
followed by the tokenizer's EOS. Sample k takes stream tokens [k*n, (k+1)*n) and
gets its position ids by the method's rule (longrecipe.samples); every sample is
checked before its part is written. `coverage` (longrecipe.coverage) counts how
much of the target window the samples reach; `check_samples`
(longrecipe.sample_checks) rechecks a finished artifact against its inputs.

All randomness is keyed: keep decisions by (seed, sentence's place in the
stream), a sample's positions by (seed, sample_id). Any part can therefore be
rebuilt alone, and a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import BuildConfig, RuntimeConfig
from longrecipe.coverage import DISTANCE_SAMPLES_PER_PART, Coverage
from longrecipe.document_stream import (
    BuildError,
    DocIndex,
    DocumentTokens,
    Stream,
    document_eos,
    read_document_index,
    read_sentences,
    select_sentences,
    whole_documents,
)
from longrecipe.progress import progress_bar
from longrecipe.sample_checks import check_samples
from longrecipe.samples import build_samples, sample_len

# The stage is here; its parts live in document_stream (inputs, the stream, sentence
# selection), samples (cutting samples, positions), coverage and sample_checks.
__all__ = [
    "DISTANCE_SAMPLES_PER_PART", "STAGE", "STAGE_VERSION", "BuildError", "DocumentTokens",
    "build_samples", "build_spec", "check_samples", "count_samples", "key_config", "run_build",
    "sample_len",
]

STAGE = "build"
STAGE_VERSION = "build_v2"  # v2: the tokenizer's EOS after every packed document

# Config fields that cannot change a method's output stay out of its key.
_UNUSED = {
    "full": {"train_len", "seed", "keep_ratio", "head_rule", "head_len", "gap_rule"},
    "randomized": {"keep_ratio", "head_rule", "head_len", "gap_rule"},
    "pose": {"keep_ratio", "head_rule", "head_len", "gap_rule"},
    "longrecipe": set(),
}


def key_config(cfg: BuildConfig) -> dict:
    """The config as it enters the key: only the fields the method uses."""
    unused = set(_UNUSED[cfg.method])
    if cfg.method == "longrecipe" and cfg.head_rule != "fixed":
        unused.add("head_len")
    return cfg.model_dump(mode="json", exclude=unused)


def build_spec(
    cfg: BuildConfig, documents: ArtifactRef, analysis: ArtifactRef | None = None
) -> StageSpec:
    inputs = {"documents": documents.key}
    if cfg.method == "longrecipe":
        if analysis is None:
            raise BuildError(
                "build.method=longrecipe needs the analysis artifact (its `sentences` table); "
                "run the analyze stage first or pick full, randomized or pose"
            )
        inputs["analysis"] = analysis.key
    return StageSpec(STAGE, STAGE_VERSION, key_config(cfg), inputs)


def run_build(
    cfg: BuildConfig,
    documents: ArtifactRef,
    analysis: ArtifactRef | None,
    store: ArtifactStore,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> ArtifactRef:
    """Build `samples` (and `coverage`) for cfg.method; returns the finished artifact."""
    spec = build_spec(cfg, documents, analysis)
    done = store.get(STAGE, spec.key)
    if done is not None:
        return done
    # Plan before taking the lock so bad input fails without leaving a partial folder.
    eos = document_eos(documents)
    docs = read_document_index(documents)
    if cfg.method == "longrecipe":
        assert analysis is not None
        stream = select_sentences(cfg, docs, read_sentences(analysis, documents, docs))
    else:
        stream = whole_documents(cfg, docs)
    length = sample_len(cfg)
    n_samples = count_samples(cfg, stream.total)
    if (
        cfg.method == "longrecipe"
        and stream.sentences is not None
        and not len(stream.sentences.doc)
    ):
        raise BuildError(
            f"build: {analysis.stage}/{analysis.key} has no sentences for the documents of "
            f"split {cfg.split!r} (the analysis scores only what it was asked to)"
        )
    if n_samples == 0:
        raise BuildError(
            f"build: documents/{documents.key} split {cfg.split!r} yields {stream.total} "
            f"{'kept ' if cfg.method == 'longrecipe' else ''}tokens, fewer than one sample of "
            f"{length} (build.{'target_len' if cfg.method == 'full' else 'train_len'}); "
            "lower it or add documents"
        )

    def body(w: StageWriter) -> None:
        tokens = DocumentTokens(documents, docs, eos)
        coverage = Coverage(cfg.target_len)
        with progress_bar("build", runtime.progress, unit="tok", total=n_samples * length) as bar:
            for part, first in enumerate(range(0, n_samples, cfg.shard_samples)):
                count = min(cfg.shard_samples, n_samples - first)
                if w.has_part("samples", part):
                    table = w.read_part("samples", part)
                else:
                    batch = build_samples(cfg, stream, tokens.gather, docs.doc_id, first, count)
                    table = batch.to_table()
                    w.write_part("samples", part, table)
                coverage.add(table)
                bar.advance(count * length)
        w.write_table("coverage", coverage.table())
        w.info.update(
            method=cfg.method,
            eos_token_id=eos,
            special_tokens=documents.info.get("special_tokens"),
            sample_len=length,
            target_len=cfg.target_len,
            tokens=n_samples * length,
            leftover_tokens=stream.total - n_samples * length,
            documents=_document_info(cfg, docs, stream, n_samples * length),
            **coverage.summary(),
            **(
                {"selection": stream.selection_info(n_samples * length)}
                if stream.sentences is not None
                else {}
            ),
        )

    return store.produce(spec, body)


def count_samples(cfg: BuildConfig, total_tokens: int) -> int:
    """Whole samples the stream holds, capped by num_samples and num_tokens (rounded up)."""
    length = sample_len(cfg)
    n = total_tokens // length
    if cfg.num_samples is not None:
        n = min(n, cfg.num_samples)
    if cfg.num_tokens is not None:
        n = min(n, -(-cfg.num_tokens // length))
    return n


def _document_info(cfg: BuildConfig, docs: DocIndex, stream: Stream, used: int) -> dict:
    n_pieces = int(np.searchsorted(stream.cum, used, side="left")) + 1 if used else 0
    return {
        "in_split": int(docs.in_split(cfg.split).sum()),
        "used": int(len(np.unique(stream.doc[:n_pieces]))),
    }

