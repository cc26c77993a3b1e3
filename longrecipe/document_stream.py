"""The stream that build cuts samples from, and what it reads to make it.

The documents of the chosen split, in artifact order, form one stream of pieces
(source token spans): whole documents for full/randomized/pose (`whole_documents`),
the kept sentences for longrecipe (`select_sentences`: every sentence with an
impactful token, each other one with probability keep_ratio), each document
followed by the tokenizer's EOS (the id ingest recorded), so packed documents never
run into each other unmarked. The EOS is stored as the document's virtual token
n_tokens: a span [s, n_tokens + 1) ends with it, and it follows the last kept
sentence with no gap when that sentence ends the document (else it is a piece of
its own). `DocumentTokens.gather` turns spans back into token ids, reading one
Parquet part of `documents` at a time as the stream advances.

Keep decisions are keyed by (seed, the sentence's place in the walk), so the stream
is the same in every run and every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from longrecipe.artifacts import ArtifactRef
from longrecipe.config import BuildConfig
from longrecipe.errors import InputError

# Independent random streams under one seed: keep decisions here, each sample's
# positions in longrecipe.samples.
KEEP_STREAM, SAMPLE_STREAM = 1, 2


class BuildError(InputError):
    """Bad input to the build stage; the message names the artifact, field or row."""


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


def list_column(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets from 0)."""
    col = table.column(column).combine_chunks()
    off = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    return values[off[0] : off[-1]], off - off[0]


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
    u = np.random.default_rng([cfg.seed, KEEP_STREAM]).random(len(walk.doc))
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

