"""Rechecking a finished build artifact against its inputs (`longrecipe.check_samples`)."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from longrecipe.artifacts import ArtifactRef, ArtifactStore
from longrecipe.document_stream import (
    DocumentTokens,
    document_eos,
    list_column,
    ranges,
    read_document_index,
    read_sentences,
)
from longrecipe.positions import InvariantError, check_positions


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
        ids, off = list_column(table, "input_ids")
        pos, poff = list_column(table, "position_ids")
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

