"""Cutting samples from the stream: token ids and the position ids they are trained at.

Sample k takes stream tokens [k*n, (k+1)*n) (n = `sample_len`): a document that runs
out continues into the next one and a sentence cut at the end of a sample starts the
next sample; the tail shorter than n is dropped. Position ids are then computed on
exactly those tokens by the method's rule (longrecipe.positions) and checked before
a batch is returned. Each sample draws from its own generator, keyed by (seed,
sample_id), so any part can be rebuilt alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from longrecipe.config import BuildConfig
from longrecipe.document_stream import SAMPLE_STREAM, Stream
from longrecipe.positions import (
    InvariantError,
    batch_positions_with_gaps,
    check_positions,
    longrecipe_gaps,
    pose_gaps,
    randomized_positions,
)

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
_NO_GAP = np.zeros(0, np.int64)


def sample_len(cfg: BuildConfig) -> int:
    """Tokens per sample: target_len for full, train_len otherwise."""
    return cfg.target_len if cfg.method == "full" else cfg.train_len


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
        rng = np.random.default_rng([cfg.seed, SAMPLE_STREAM, first + k])
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

