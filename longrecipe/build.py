"""Sample building: token sequences with the position ids they are trained at.

Reads `documents` (and, for LongRecipe, the analysis `sentences`), writes
`samples` in resumable parts and a small `coverage` table.

How a sample is made. The documents of the chosen split, in artifact order,
form one stream of pieces: whole documents for full/randomized/pose, the kept
sentences for longrecipe (every sentence with an impactful token, each other
one with probability keep_ratio), each document followed by the tokenizer's
EOS (the id ingest recorded), so packed documents never run into each other
unmarked. The EOS is stored as the document's virtual token n_tokens: a span
[s, n_tokens + 1) ends with it, and it follows the last kept sentence with no
gap when that sentence ends the document (else it is a piece of its own).
Sample k takes stream tokens [k*n, (k+1)*n): a document that runs out
continues into the next one and a sentence cut at the end of a sample starts
the next sample; the tail shorter than n is dropped. Position ids are then computed on exactly those tokens
(longrecipe.positions) and checked before the part is written.

All randomness is keyed: keep decisions by (seed, sentence's place in the
stream), a sample's positions by (seed, sample_id). Any part can therefore be
rebuilt alone, and a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import BuildConfig, RuntimeConfig
from longrecipe.errors import InputError
from longrecipe.positions import (
    InvariantError,
    batch_positions_with_gaps,
    check_positions,
    longrecipe_gaps,
    pose_gaps,
    randomized_positions,
)
from longrecipe.progress import progress_bar

STAGE = "build"
STAGE_VERSION = "build_v2"  # v2: the tokenizer's EOS after every packed document

SPAN_TYPE = pa.struct([("doc_id", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("method", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("doc_ids", pa.list_(pa.string())),
        ("spans", pa.list_(SPAN_TYPE)),
        ("n_tokens", pa.int32()),
        ("max_position", pa.int32()),
        ("head_len", pa.int32()),
    ]
)
COVERAGE_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("bin_start", pa.int64()),
        ("bin_end", pa.int64()),
        ("count", pa.int64()),
        ("samples", pa.int64()),
    ]
)
COVERAGE_BINS = 20
_NO_GAP = np.zeros(0, np.int64)
# Pair distances cost an FFT of ~2*target_len per sample (16 ms at 80k, longer than
# building the sample): they are counted on this many evenly spaced samples per part.
DISTANCE_SAMPLES_PER_PART = 16

# Independent random streams under one seed.
_KEEP_STREAM, _SAMPLE_STREAM = 1, 2

# Config fields that cannot change a method's output stay out of its key.
_UNUSED = {
    "full": {"train_len", "seed", "keep_ratio", "head_rule", "head_len", "gap_rule"},
    "randomized": {"keep_ratio", "head_rule", "head_len", "gap_rule"},
    "pose": {"keep_ratio", "head_rule", "head_len", "gap_rule"},
    "longrecipe": set(),
}


class BuildError(InputError):
    """Bad input to the build stage; the message names the artifact, field or row."""


def sample_len(cfg: BuildConfig) -> int:
    """Tokens per sample: target_len for full, train_len otherwise."""
    return cfg.target_len if cfg.method == "full" else cfg.train_len


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


# --------------------------------------------------------------------------- inputs


def document_eos(documents: ArtifactRef) -> int:
    """The EOS id build puts after every document: the tokenizer's, as ingest recorded it."""
    special = documents.info.get("special_tokens")
    where = f"{documents.stage}/{documents.key}"
    if not isinstance(special, dict):
        raise BuildError(
            f"{where} records no special tokens (made by an ingest before ingest_v2?): "
            "rerun the ingest stage"
        )
    eos = special.get("eos_token_id")
    if eos is None:
        raise BuildError(
            f"{where}: the tokenizer has no EOS token, so packed documents cannot be separated"
        )
    return int(eos)


@dataclass
class DocIndex:
    """Every document of an artifact, in order, without its tokens."""

    doc_id: pa.Array
    split: np.ndarray
    n_tokens: np.ndarray
    part: np.ndarray
    row: np.ndarray

    def in_split(self, split: str) -> np.ndarray:
        return np.ones(len(self.n_tokens), bool) if split == "all" else self.split == split


def read_document_index(documents: ArtifactRef) -> DocIndex:
    if not documents.files("documents"):
        raise BuildError(f"{documents.stage}/{documents.key} has no `documents` table")
    ids, splits, lens, parts, rows = [], [], [], [], []
    cols = ["doc_id", "split", "n_tokens"]
    for p, t in enumerate(documents.iter_parts("documents", columns=cols)):
        ids.append(t.column("doc_id").combine_chunks())
        splits.append(np.asarray(t.column("split").to_pylist(), dtype=object))
        lens.append(t.column("n_tokens").to_numpy().astype(np.int64))
        parts.append(np.full(t.num_rows, p, np.int64))
        rows.append(np.arange(t.num_rows, dtype=np.int64))
    return DocIndex(
        pa.concat_arrays(ids).cast(pa.string()),
        np.concatenate(splits),
        np.concatenate(lens),
        np.concatenate(parts),
        np.concatenate(rows),
    )


@dataclass
class Sentences:
    """Analysis sentences of the documents, sorted by (document, start)."""

    doc: np.ndarray
    start: np.ndarray
    end: np.ndarray
    impactful: np.ndarray


def read_sentences(analysis: ArtifactRef, documents: ArtifactRef, docs: DocIndex) -> Sentences:
    """The analysis `sentences` table, validated against the documents."""
    where = f"{analysis.stage}/{analysis.key}"
    made_from = analysis.manifest.get("inputs", {}).get("documents")
    if made_from != documents.key:
        raise BuildError(
            f"{where} was made from documents/{made_from}, not documents/{documents.key}"
        )
    if not analysis.files("sentences"):
        raise BuildError(f"{where} has no `sentences` table")
    need = ["doc_id", "start", "end", "impactful"]
    have = pq.read_schema(analysis.files("sentences")[0], filesystem=analysis.fs).names
    missing = [c for c in need if c not in have]
    if missing:
        raise BuildError(f"{where}: table sentences lacks column(s) {', '.join(missing)}")
    t = analysis.read_table("sentences", columns=need)  # not the sentence texts
    for c in need:
        if t.column(c).null_count:
            row = int(np.flatnonzero(t.column(c).is_null().to_numpy(zero_copy_only=False))[0])
            raise BuildError(f"{where}: sentences row {row}: {c} is null")
    ids = t.column("doc_id").cast(pa.string())
    doc = pc.index_in(ids, value_set=docs.doc_id).to_numpy(zero_copy_only=False)
    if np.isnan(doc).any():
        row = int(np.flatnonzero(np.isnan(doc))[0])
        raise BuildError(
            f"{where}: sentences row {row}: doc_id {t.column('doc_id')[row].as_py()!r} "
            f"is not in documents/{documents.key}"
        )
    doc = doc.astype(np.int64)
    start = t.column("start").to_numpy().astype(np.int64)
    end = t.column("end").to_numpy().astype(np.int64)
    bad = np.flatnonzero((start < 0) | (end <= start) | (end > docs.n_tokens[doc]))
    if len(bad):
        r = int(bad[0])
        raise BuildError(
            f"{where}: sentences row {r}: span [{start[r]}, {end[r]}) is empty or outside "
            f"document {docs.doc_id[doc[r]].as_py()} ({docs.n_tokens[doc[r]]} tokens)"
        )
    order = np.lexsort((start, doc))
    doc, start, end = doc[order], start[order], end[order]
    overlap = np.flatnonzero((doc[1:] == doc[:-1]) & (start[1:] < end[:-1]))
    if len(overlap):
        r = int(order[overlap[0] + 1])
        raise BuildError(f"{where}: sentences row {r} overlaps the sentence before it")
    impactful = t.column("impactful").to_numpy(zero_copy_only=False).astype(bool)[order]
    # int32 halves what a billion-token corpus's sentence index holds in memory.
    return Sentences(doc.astype(np.int32), start.astype(np.int32), end.astype(np.int32), impactful)


class DocumentTokens:
    """input_ids of documents, read one Parquet part at a time as the stream advances;
    index n_tokens of a document is its EOS (see the module docstring)."""

    def __init__(self, documents: ArtifactRef, docs: DocIndex, eos: int):
        self.files, self.fs, self.docs = documents.files("documents"), documents.fs, docs
        self.eos = eos
        self._parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _load(self, part: int) -> tuple[np.ndarray, np.ndarray]:
        if part not in self._parts:
            col = pq.read_table(self.files[part], columns=["input_ids"], filesystem=self.fs)
            ids = col.column("input_ids").combine_chunks()
            self._parts[part] = (
                ids.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
                ids.offsets.to_numpy().astype(np.int64),
            )
        return self._parts[part]

    def gather(self, doc: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
        """Tokens doc[j][start[j]:start[j]+length[j]] for every j, concatenated; a run that
        reaches index n_tokens ends with the EOS."""
        tail = start + length == self.docs.n_tokens[doc] + 1
        if not tail.any():
            return self._gather(doc, start, length)
        src = length - tail
        got = self._gather(doc, start, src)
        return np.insert(got, np.cumsum(src)[tail], np.int32(self.eos))

    def _gather(self, doc: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
        out = np.empty(int(length.sum()), dtype=np.int32)
        out_start = np.cumsum(length) - length
        parts = self.docs.part[doc]
        needed = np.unique(parts)
        for p in list(self._parts):  # the stream only moves forward through the parts
            if p < needed[0]:
                del self._parts[p]
        for p in needed:
            values, offsets = self._load(int(p))
            m = np.flatnonzero(parts == p)
            rows = self.docs.row[doc[m]]
            over = start[m] + length[m] > offsets[rows + 1] - offsets[rows]
            if over.any():
                raise BuildError(
                    f"document {self.docs.doc_id[doc[m][np.flatnonzero(over)[0]]].as_py()}: "
                    "input_ids shorter than its n_tokens"
                )
            got = take_runs(values, offsets[rows] + start[m], length[m])
            if m[-1] - m[0] == len(m) - 1:  # this part's segments are one block of the output
                out[out_start[m[0]] : out_start[m[0]] + len(got)] = got
            else:
                out[ranges(out_start[m], length[m])] = got
        return out


def take_runs(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """values[s:s+n] for every (s, n), concatenated. Sorted, disjoint runs (the usual case:
    the stream walks forward) are cut with one boolean mask over their hull, a byte per
    token instead of an int64 index; anything else goes through `ranges`."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    keep = lengths > 0
    if not keep.all():
        starts, lengths = starts[keep], lengths[keep]
    if len(starts) == 0:
        return values[:0]
    ends = starts + lengths
    holes = starts[1:] - ends[:-1]
    if (holes < 0).any():
        return values[ranges(starts, lengths)]
    runs = np.empty(2 * len(starts) - 1, np.int64)
    runs[0::2], runs[1::2] = lengths, holes
    taken = np.zeros(len(runs), bool)
    taken[0::2] = True
    return values[starts[0] : ends[-1]][np.repeat(taken, runs)]


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for every (s, n), without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    shift = np.asarray(starts, dtype=np.int64) - (np.cumsum(lengths) - lengths)
    return np.repeat(shift, lengths) + np.arange(total, dtype=np.int64)


# --------------------------------------------------------------------------- the stream


@dataclass
class Stream:
    """The pieces samples are cut from, in walk order (source token spans)."""

    doc: np.ndarray
    start: np.ndarray
    end: np.ndarray
    sentences: Sentences | None = None
    """For longrecipe: every sentence walked, and which were kept."""
    kept: np.ndarray | None = None
    piece_sentence: np.ndarray | None = None
    skipped_docs: int = 0
    cum: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.cum = np.cumsum(self.end - self.start, dtype=np.int64)

    @property
    def total(self) -> int:
        return int(self.cum[-1]) if len(self.cum) else 0

    def selection_info(self, used: int) -> dict:
        """Which sentences were kept among those walked by the first `used` tokens."""
        assert self.sentences is not None and self.kept is not None
        last = int(np.searchsorted(self.cum, used, side="left"))
        walked = int(self.piece_sentence[last]) + 1 if len(self.cum) else 0
        imp, kept = self.sentences.impactful[:walked], self.kept[:walked]
        other = int((~imp).sum())
        return {
            "walked_sentences": walked,
            "impactful_sentences": int(imp.sum()),
            "kept_impactful": int((kept & imp).sum()),
            "other_sentences": other,
            "kept_other": int((kept & ~imp).sum()),
            "keep_rate_other": round(float((kept & ~imp).sum()) / other, 4) if other else None,
            "documents_without_analysis": self.skipped_docs,
        }


def whole_documents(cfg: BuildConfig, docs: DocIndex) -> Stream:
    """Every document of the split with its EOS (its virtual token n_tokens)."""
    sel = np.flatnonzero(docs.in_split(cfg.split) & (docs.n_tokens > 0))
    return Stream(sel, np.zeros(len(sel), np.int64), docs.n_tokens[sel] + 1)


def select_sentences(cfg: BuildConfig, docs: DocIndex, sents: Sentences) -> Stream:
    """Walk the split's sentences in order: keep every impactful one, each other one with
    probability keep_ratio (one uniform draw per sentence, keyed by its place in the walk)."""
    in_split = docs.in_split(cfg.split)
    m = in_split[sents.doc]
    walk = Sentences(sents.doc[m], sents.start[m], sents.end[m], sents.impactful[m])
    u = np.random.default_rng([cfg.seed, _KEEP_STREAM]).random(len(walk.doc))
    kept = walk.impactful | (u < cfg.keep_ratio)
    idx = np.flatnonzero(kept)
    analysed = np.zeros(len(in_split), bool)
    analysed[walk.doc] = True
    skipped = int((in_split & ~analysed).sum())
    doc = walk.doc[idx].astype(np.int64)
    start, end = walk.start[idx].astype(np.int64), walk.end[idx].astype(np.int64)
    # Each document's EOS: glued to its last kept piece when that one ends the document,
    # else a piece of its own (mapped to the document's last walked sentence).
    last = np.flatnonzero(np.append(doc[1:] != doc[:-1], True)) if len(doc) else doc
    n = docs.n_tokens[doc[last]]
    glued = end[last] == n
    end[last[glued]] += 1
    alone = last[~glued]
    at = alone + 1
    last_walked = np.searchsorted(walk.doc, doc[alone], side="right") - 1
    return Stream(
        np.insert(doc, at, doc[alone]),
        np.insert(start, at, n[~glued]),
        np.insert(end, at, n[~glued] + 1),
        walk, kept, np.insert(idx, at, last_walked), skipped_docs=skipped,
    )


def _document_info(cfg: BuildConfig, docs: DocIndex, stream: Stream, used: int) -> dict:
    n_pieces = int(np.searchsorted(stream.cum, used, side="left")) + 1 if used else 0
    return {
        "in_split": int(docs.in_split(cfg.split).sum()),
        "used": int(len(np.unique(stream.doc[:n_pieces]))),
    }


# --------------------------------------------------------------------------- samples


@dataclass
class SampleBatch:
    """Samples first_id .. first_id+count-1, stored flat (each `length` tokens)."""

    method: str
    first_id: int
    length: int
    input_ids: np.ndarray
    position_ids: np.ndarray
    head_len: np.ndarray
    span_doc: np.ndarray  # spans: maximal runs of consecutive source tokens, per sample
    span_start: np.ndarray
    span_end: np.ndarray
    span_offsets: np.ndarray
    doc_ids: pa.Array

    @property
    def count(self) -> int:
        return len(self.head_len)

    def to_table(self) -> pa.Table:
        n, L = self.count, self.length
        off = pa.array(np.arange(n + 1, dtype=np.int32) * L, pa.int32())
        span_off = pa.array(self.span_offsets.astype(np.int32), pa.int32())
        span_doc_ids = self.doc_ids.take(pa.array(self.span_doc))
        spans = pa.StructArray.from_arrays(
            [
                span_doc_ids,
                pa.array(self.span_start, pa.int32()),
                pa.array(self.span_end, pa.int32()),
            ],
            fields=list(SPAN_TYPE),
        )
        # A document's pieces are consecutive in the stream, so each appears in one run.
        same = np.zeros(len(self.span_doc), bool)
        same[1:] = self.span_doc[1:] == self.span_doc[:-1]
        same[self.span_offsets[:-1]] = False  # each sample lists its own documents
        first = np.flatnonzero(~same)
        doc_off = np.searchsorted(first, self.span_offsets).astype(np.int32)
        return pa.Table.from_arrays(
            [
                pa.array(self.first_id + np.arange(n), pa.int64()),
                pa.array([self.method] * n, pa.string()),
                pa.ListArray.from_arrays(off, pa.array(self.input_ids, pa.int32())),
                pa.ListArray.from_arrays(
                    off, pa.array(self.position_ids.astype(np.int32), pa.int32())
                ),
                pa.ListArray.from_arrays(
                    pa.array(doc_off, pa.int32()), span_doc_ids.take(pa.array(first))
                ),
                pa.ListArray.from_arrays(span_off, spans),
                pa.array(np.full(n, L), pa.int32()),
                pa.array(self.position_ids[L - 1 :: L].astype(np.int32), pa.int32()),
                pa.array(self.head_len.astype(np.int32), pa.int32()),
            ],
            schema=SAMPLES_SCHEMA,
        )


Gather = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def build_samples(
    cfg: BuildConfig, stream: Stream, gather: Gather, doc_ids: pa.Array, first: int, count: int
) -> SampleBatch:
    """Samples first .. first+count-1: tokens from the stream, positions by cfg.method,
    every invariant checked. `gather(doc, start, length)` returns the source tokens;
    doc_ids names the documents that stream.doc indexes."""
    L, T = sample_len(cfg), cfg.target_len
    a, b = first * L, (first + count) * L
    if b > stream.total:
        raise ValueError(f"samples {first}..{first + count - 1} run past the stream's end")
    # Segments: the stream's pieces cut at sample boundaries (a sorted merge of the two).
    i0 = int(np.searchsorted(stream.cum, a, side="right"))
    i1 = int(np.searchsorted(stream.cum, b, side="left"))
    cum = stream.cum[i0 : i1 + 1]
    begin = cum - (stream.end[i0 : i1 + 1] - stream.start[i0 : i1 + 1])
    inner = np.flatnonzero((begin > a) & ((begin - a) % L != 0))  # pieces starting mid-sample
    bounds = a + np.arange(count, dtype=np.int64) * L
    is_bound = np.zeros(len(inner) + count, bool)
    is_bound[np.searchsorted(begin[inner], bounds) + np.arange(count)] = True
    seg_begin = np.empty(len(is_bound), np.int64)
    seg_begin[is_bound], seg_begin[~is_bound] = bounds, begin[inner]
    piece = np.empty(len(is_bound), np.int64)
    piece[is_bound] = np.searchsorted(cum, bounds, side="right")
    piece[~is_bound] = inner
    seg_end = np.append(seg_begin[1:], b)
    seg_doc = stream.doc[i0 + piece]
    seg_src = stream.start[i0 + piece] + (seg_begin - begin[piece])
    seg_len = seg_end - seg_begin
    seg_sample = np.cumsum(is_bound) - 1
    seg_off = seg_begin - a - seg_sample * L
    seg_lo = np.append(np.flatnonzero(is_bound), len(is_bound))

    input_ids = gather(seg_doc, seg_src, seg_len)
    heads = np.empty(count, dtype=np.int64)
    source = cfg.method == "longrecipe" and cfg.gap_rule == "source"
    if source:  # tokens skipped in the source before each segment (0 across documents)
        distance = np.zeros(len(seg_doc), np.int64)
        same = (seg_doc[1:] == seg_doc[:-1]) & (seg_sample[1:] == seg_sample[:-1])
        distance[1:] = np.where(same, seg_src[1:] - (seg_src[:-1] + seg_len[:-1]), 0)
    # Each sample draws from its own generator; full, pose and longrecipe come back in gap
    # form (boundaries, gaps) and are turned into positions in one pass over the batch.
    boundaries, gaps, dense = [], [], []
    for k in range(count):
        rng = np.random.default_rng([cfg.seed, _SAMPLE_STREAM, first + k])
        if cfg.method == "full":
            at, gap, head = _NO_GAP, _NO_GAP, L
        elif cfg.method == "randomized":
            dense.append(randomized_positions(rng, L, T))
            head = 1
        elif cfg.method == "pose":
            at, gap, head = pose_gaps(rng, L, T)
        else:
            sl = slice(seg_lo[k], seg_lo[k + 1])
            at, gap, head = longrecipe_gaps(
                rng,
                L,
                T,
                seg_off[sl],
                head_rule=cfg.head_rule,
                head_len=cfg.head_len,
                distances=distance[sl] if source else None,
            )
        if cfg.method != "randomized":
            boundaries.append(at)
            gaps.append(gap)
        heads[k] = head
    if dense:
        positions = np.concatenate(dense).astype(np.int32)
    else:
        positions = batch_positions_with_gaps(L, boundaries, gaps)

    jumps = None
    if cfg.method == "longrecipe":
        jumps = np.zeros(count * L, bool)
        jumps[seg_begin - a] = True
    check_positions(
        positions,
        np.arange(count + 1) * L,
        length=L,
        target_len=T,
        jumps_allowed=jumps,
        first_id=first,
    )
    if len(input_ids) != len(positions):
        raise InvariantError(f"samples from {first}: input_ids and position_ids differ in length")

    # Spans: merge segments that continue each other in the same document and sample.
    cont = np.zeros(len(seg_doc), bool)
    cont[1:] = (
        (seg_doc[1:] == seg_doc[:-1])
        & (seg_sample[1:] == seg_sample[:-1])
        & (seg_src[1:] == seg_src[:-1] + seg_len[:-1])
    )
    span_first = np.flatnonzero(~cont)
    span_last = np.append(span_first[1:], len(seg_doc)) - 1
    return SampleBatch(
        method=cfg.method,
        first_id=first,
        length=L,
        input_ids=input_ids,
        position_ids=positions,
        head_len=heads,
        span_doc=seg_doc[span_first],
        span_start=seg_src[span_first],
        span_end=seg_src[span_last] + seg_len[span_last],
        span_offsets=np.searchsorted(seg_sample[span_first], np.arange(count + 1)),
        doc_ids=doc_ids,
    )


# --------------------------------------------------------------------------- coverage


def _flat(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets from 0)."""
    col = table.column(column).combine_chunks()
    off = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    return values[off[0] : off[-1]], off - off[0]


class Coverage:
    """How much of the target window the samples reach: histograms of max positions, of
    gaps (positions skipped between neighbouring tokens) and of the relative distances
    between token pairs (exact pair counts per distance by FFT autocorrelation, on up to
    DISTANCE_SAMPLES_PER_PART evenly spaced samples of each part)."""

    def __init__(self, target_len: int):
        self.T = target_len
        self.edges = np.unique(
            np.linspace(0, target_len, COVERAGE_BINS + 1).round().astype(np.int64)
        )
        self.gap_edges = np.concatenate(
            [[0], 2 ** np.arange(int(np.ceil(np.log2(max(target_len, 2)))) + 1)]
        )
        self.max_positions: list[np.ndarray] = []
        self.gaps = np.zeros(len(self.gap_edges) - 1, np.int64)
        self.gap_samples = np.zeros(len(self.gap_edges) - 1, np.int64)
        self.pairs = np.zeros(target_len, np.int64)
        self.pair_samples = np.zeros(len(self.edges) - 1, np.int64)
        self.n_tokens = 0
        self.distance_samples = 0

    def add(self, table: pa.Table, chunk: int = 16) -> None:
        """Count one part of `samples` (a few samples at a time, to bound memory)."""
        self.max_positions.append(table.column("max_position").to_numpy().astype(np.int64))
        n = table.num_rows
        picked = np.unique(np.linspace(0, n - 1, min(n, DISTANCE_SAMPLES_PER_PART)).round())
        for c in range(0, n, chunk):
            rows = table.slice(c, chunk)
            pos, off = _flat(rows, "position_ids")
            self._gaps(pos.astype(np.int64), off)
            mine = picked[(picked >= c) & (picked < c + chunk)].astype(np.int64) - c
            self._distances(pos, off, mine)

    def _gaps(self, pos: np.ndarray, off: np.ndarray) -> None:
        self.n_tokens += len(pos)
        step = np.diff(pos) - 1
        inside = np.ones(len(step), bool)
        inside[off[1:-1] - 1] = False
        sample = np.repeat(np.arange(len(off) - 1), np.diff(off))[1:][inside]
        gap = step[inside]
        gbin = np.searchsorted(self.gap_edges, gap, side="right") - 1
        self.gaps += np.bincount(gbin, minlength=len(self.gaps))
        hit = np.unique(sample * len(self.gaps) + gbin)
        self.gap_samples += np.bincount(hit % len(self.gaps), minlength=len(self.gaps))

    def _distances(
        self, pos: np.ndarray, off: np.ndarray, picked: np.ndarray, chunk: int = 8
    ) -> None:
        """Pair counts per distance: the autocorrelation of each sample's position set."""
        nfft = _fft_len(2 * self.T - 1)
        self.distance_samples += len(picked)
        for c in range(0, len(picked), chunk):
            rows = picked[c : c + chunk]
            x = np.zeros((len(rows), self.T))
            for r, i in enumerate(rows):
                x[r, pos[off[i] : off[i + 1]]] = 1.0
            f = np.fft.rfft(x, nfft)
            counts = np.rint(np.fft.irfft(f * f.conj(), nfft)[:, : self.T]).astype(np.int64)
            counts[:, 0] = 0  # a token with itself
            self.pairs += counts.sum(0)
            per_bin = np.add.reduceat(counts, self.edges[:-1], axis=1)
            self.pair_samples += (per_bin > 0).sum(0)

    def table(self) -> pa.Table:
        """Rows (kind, bin_start, bin_end, count, samples) for the `coverage` table."""
        maxp = np.concatenate(self.max_positions) if self.max_positions else np.zeros(0, np.int64)
        mcount = np.histogram(maxp, self.edges)[0]
        dcount = np.add.reduceat(self.pairs, self.edges[:-1])
        k = len(self.gaps)
        kinds = ["max_position"] * len(mcount) + ["gap"] * k + ["distance"] * len(dcount)
        return pa.Table.from_arrays(
            [
                pa.array(kinds, pa.string()),
                pa.array(np.concatenate([self.edges[:-1], self.gap_edges[:-1], self.edges[:-1]])),
                pa.array(np.concatenate([self.edges[1:], self.gap_edges[1:], self.edges[1:]])),
                pa.array(np.concatenate([mcount, self.gaps, dcount]).astype(np.int64)),
                pa.array(
                    np.concatenate([mcount, self.gap_samples, self.pair_samples]).astype(np.int64)
                ),
            ],
            schema=COVERAGE_SCHEMA,
        )

    def summary(self) -> dict:
        maxp = np.concatenate(self.max_positions)
        covered = int((self.pairs[1:] > 0).sum())
        return {
            "samples": int(len(maxp)),
            "max_position": {
                "min": int(maxp.min()),
                "mean": round(float(maxp.mean()), 2),
                "max": int(maxp.max()),
            },
            "reach": round(float((maxp + 1).mean()) / self.T, 4),
            "distance_coverage": round(covered / max(self.T - 1, 1), 4),
            "distance_samples": self.distance_samples,
            "mean_gap": round(
                float((maxp + 1).sum() - self.n_tokens) / max(self.n_tokens - len(maxp), 1), 4
            ),
        }


# --------------------------------------------------------------------------- verification


def check_samples(ref: ArtifactRef, store: ArtifactStore) -> dict:
    """Recheck a finished build artifact against its inputs; raise InvariantError on the
    first problem. Every sample: the method's length; tokens equal to the documents'
    tokens at its spans (positions belong to exactly the trained tokens); positions start
    at 0, increase strictly, stay below target_len; the head keeps 0..head_len-1;
    max_position is the last position. longrecipe: gaps only at kept sentence starts."""
    cfg = ref.manifest["config"]
    method, target = cfg["method"], cfg["target_len"]
    length = target if method == "full" else cfg["train_len"]
    documents = store.find(ref.manifest["inputs"]["documents"])
    docs = read_document_index(documents)
    tokens = DocumentTokens(documents, docs, document_eos(documents))
    sent_key = None
    if method == "longrecipe":
        analysis = store.find(ref.manifest["inputs"]["analysis"])
        s = read_sentences(analysis, documents, docs)
        sent_key = (s.doc.astype(np.int64) << 32) + s.start
    n = 0
    for table in ref.iter_parts("samples"):
        first = int(table.column("sample_id")[0].as_py()) if table.num_rows else n
        ids, off = _flat(table, "input_ids")
        pos, poff = _flat(table, "position_ids")
        if not np.array_equal(off, poff):
            raise InvariantError(
                f"samples from {first}: input_ids and position_ids differ in length"
            )
        if (table.column("method").to_numpy(zero_copy_only=False) != method).any():
            raise InvariantError(f"samples from {first}: method column is not {method!r}")
        if not np.array_equal(
            table.column("sample_id").to_numpy(), np.arange(n, n + table.num_rows)
        ):
            raise InvariantError(f"samples from {first}: sample_id not consecutive from {n}")
        spans = table.column("spans").combine_chunks()
        span_off = spans.offsets.to_numpy().astype(np.int64)
        flat = spans.values
        span_doc = pc.index_in(flat.field("doc_id"), value_set=docs.doc_id).to_numpy(
            zero_copy_only=False
        )
        span_doc = span_doc.astype(np.int64)
        s_start = flat.field("start").to_numpy().astype(np.int64)
        s_end = flat.field("end").to_numpy().astype(np.int64)
        sl = slice(span_off[0], span_off[-1])
        span_doc, s_start, s_end = span_doc[sl], s_start[sl], s_end[sl]
        span_off = span_off - span_off[0]
        per_sample = np.add.reduceat(s_end - s_start, span_off[:-1])
        if not np.array_equal(per_sample, np.diff(off)):
            bad = int(np.flatnonzero(per_sample != np.diff(off))[0])
            raise InvariantError(
                f"sample {n + bad}: spans cover {per_sample[bad]} tokens, not {off[bad + 1] - off[bad]}"
            )
        source = tokens.gather(span_doc, s_start, s_end - s_start)
        if not np.array_equal(source, ids):
            bad = int(np.searchsorted(off, np.flatnonzero(source != ids)[0], side="right") - 1)
            raise InvariantError(
                f"sample {n + bad}: input_ids differ from the documents' tokens at its spans"
            )
        jumps = None
        if sent_key is not None:
            # Allowed jumps: each span's first token and every sentence start inside a span.
            span_out = np.cumsum(s_end - s_start) - (s_end - s_start)
            lo = np.searchsorted(sent_key, span_doc * (1 << 32) + s_start, side="right")
            hi = np.searchsorted(sent_key, span_doc * (1 << 32) + s_end, side="left")
            inner = ranges(lo, np.maximum(hi - lo, 0))
            owner = np.repeat(np.arange(len(lo)), np.maximum(hi - lo, 0))
            jumps = np.zeros(len(pos), bool)
            jumps[span_out] = True
            jumps[
                span_out[owner] + (sent_key[inner] - (span_doc[owner] << 32)) - s_start[owner]
            ] = True
        check_positions(pos, off, length=length, target_len=target, jumps_allowed=jumps, first_id=n)
        heads = table.column("head_len").to_numpy().astype(np.int64)
        head_idx = ranges(off[:-1], heads)
        if not np.array_equal(pos[head_idx], ranges(np.zeros(len(heads), np.int64), heads)):
            raise InvariantError(f"samples from {n}: a head does not keep positions 0..head_len-1")
        if not np.array_equal(table.column("max_position").to_numpy(), pos[off[1:] - 1]):
            raise InvariantError(f"samples from {n}: max_position is not the last position")
        if (table.column("n_tokens").to_numpy() != length).any():
            raise InvariantError(f"samples from {n}: n_tokens is not {length}")
        n += table.num_rows
    if n != ref.manifest["tables"]["samples"]["rows"]:
        raise InvariantError(f"{ref.key}: {n} samples read, manifest says otherwise")
    return {"samples": n, "method": method, "length": length, "target_len": target}


def _fft_len(n: int) -> int:
    """The smallest 2^a * 3^b * 5^c >= n (the sizes pocketfft transforms fastest)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best
