"""The analysis tables and how they are read and written.

- token_scores: one row per document, lists aligned with documents.input_ids:
  logprob (long pass), logprob_ref (logit_delta's reference), logprob_short (lsd's
  short pass), score, impactful (under the unit in use), context (tokens each score
  saw).
- sentences: one row per sentence (documents.sentence_ends): start, end, tokens,
  impactful tokens, their share, the largest score, the flag build reads, the text.
- token_stats: one row per token id seen: its text and category, counts, mean score
  and log-prob over the corpus, whether the type is impactful (unit=type's rule),
  and how often its occurrences were flagged.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longrecipe.artifacts import ArtifactRef
from longrecipe.scoring import AnalyzeError, Doc, Scores
from longrecipe.selection import TypeStats
from longrecipe.token_categories import categories

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
        ("share", pa.float32()),
        ("max_score", pa.float32()),
        ("impactful", pa.bool_()),
        ("text", pa.large_string()),
    ]
)

TOKEN_STATS_SCHEMA = pa.schema(
    [
        ("token_id", pa.int32()),
        ("token", pa.string()),
        ("category", pa.string()),
        ("count", pa.int64()),
        ("n", pa.int64()),
        ("n_scored", pa.int64()),
        ("n_impactful", pa.int64()),
        ("mean_score", pa.float64()),
        ("mean_logprob", pa.float64()),
        ("impactful_type", pa.bool_()),
        ("impactful_rate", pa.float64()),
    ]
)


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


def with_flags(part: pa.Table, flags: list[np.ndarray]) -> pa.Table:
    """A token_scores part with its `impactful` column replaced."""
    col = pa.array([f.tolist() for f in flags], pa.list_(pa.bool_()))
    return part.set_column(part.schema.get_field_index("impactful"), "impactful", col)


def sentences_table(docs: list[Doc], part: pa.Table, flags: list[np.ndarray],
                    flagged: np.ndarray, tok) -> pa.Table:
    """The sentences of one shard; `flags` are each document's impactful tokens and
    `flagged` the sentence flags of the shard (in document then sentence order)."""
    rows: dict[str, list] = {f.name: [] for f in SENTENCES_SCHEMA}
    k = 0
    for d, score, f in zip(docs, part.column("score").to_pylist(), flags, strict=True):
        score = np.asarray(score, np.float32)
        start = 0
        for j, end in enumerate(d.ends.tolist()):
            sc = score[start:end]
            finite = sc[np.isfinite(sc)]
            n_imp = int(f[start:end].sum())
            rows["doc_id"].append(d.doc_id)
            rows["sentence_index"].append(j)
            rows["start"].append(start)
            rows["end"].append(end)
            rows["n_tokens"].append(end - start)
            rows["n_impactful"].append(n_imp)
            rows["share"].append(n_imp / (end - start))
            rows["max_score"].append(float(finite.max()) if len(finite) else None)
            rows["impactful"].append(bool(flagged[k]))
            rows["text"].append(tok.decode(d.ids[start:end].tolist()))
            start = end
            k += 1
    return pa.Table.from_pydict(rows, schema=SENTENCES_SCHEMA)


def token_stats_table(stats: TypeStats, n_impactful: np.ndarray, type_flags: np.ndarray | None,
                      tok) -> pa.Table:
    present = np.flatnonzero(stats.count)
    n_imp = np.pad(n_impactful, (0, max(0, stats.size - len(n_impactful))))[present]
    count = stats.count[present]
    impactful_type = (
        pa.array(type_flags[present], pa.bool_()) if type_flags is not None
        else pa.nulls(len(present), pa.bool_())
    )
    return pa.Table.from_arrays(
        [
            pa.array(present, pa.int32()),
            pa.array([tok.decode([int(t)]) for t in present], pa.string()),
            pa.array(categories(tok, present), pa.string()),
            pa.array(count, pa.int64()),
            pa.array(count, pa.int64()),
            pa.array(stats.n_scored[present], pa.int64()),
            pa.array(n_imp, pa.int64()),
            pa.array(stats.mean_score()[present], pa.float64()),
            pa.array(stats.mean_logprob()[present], pa.float64()),
            impactful_type,
            pa.array(n_imp / count, pa.float64()),
        ],
        schema=TOKEN_STATS_SCHEMA,
    )


# --------------------------------------------------------------------------- documents


class DocReader:
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
