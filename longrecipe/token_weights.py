"""LongCE-style loss weights for training samples, from the scores the analysis stored.

LongCE (REFERENCE.md) weights each label token's cross-entropy by min(exp(LSD), 5),
LSD being how much better the token is predicted with long context than with a short
window; it recomputes the short pass online at every step. The lsd analysis has already
stored that difference for every token it scored (`token_scores.score`: long minus short
log-probability), so training reads it instead: each sample's spans (doc_id, start, end)
say which document tokens it is made of, in order, and the weights follow them.

A token without a score gets weight 1 (the weight of LSD 0): a document the analysis
did not reach (analyze.max_documents), the first token of a document (no context, NaN
score), and the EOS build puts after each document (index n_tokens of its document).
`coverage` counts how many weighted tokens had a score, so a run can say how much of its
loss LongCE actually touched.
"""

from __future__ import annotations

import numpy as np

from longrecipe.artifacts import ArtifactRef
from longrecipe.batches import TrainError
from longrecipe.config import LossWeightsConfig


class TokenWeights:
    """min(exp(score), cap) per scored token of every analysed document."""

    def __init__(self, analysis: ArtifactRef, cfg: LossWeightsConfig, samples: ArtifactRef):
        where = f"{analysis.stage}/{analysis.key}"
        method = analysis.manifest.get("config", {}).get("method")
        if method != "lsd":
            raise TrainError(
                f"train.loss_weights (LongCE) needs an lsd analysis (its scores are LSD); {where} "
                f"is a {method!r} analysis: set analyze.method=lsd"
            )
        docs_a = analysis.manifest.get("inputs", {}).get("documents")
        docs_s = samples.manifest.get("inputs", {}).get("documents")
        if docs_a != docs_s:
            raise TrainError(
                f"train.loss_weights: the analysis {where} scored documents {docs_a}, the samples "
                f"{samples.stage}/{samples.key} were built from documents {docs_s}"
            )
        self.cap = cfg.cap
        t = analysis.read_table("token_scores", columns=["doc_id", "score"])
        scores = t.column("score").combine_chunks()
        offsets, values = scores.offsets.to_numpy(), scores.values.to_numpy(zero_copy_only=False)
        with np.errstate(over="ignore", invalid="ignore"):
            w = np.minimum(np.exp(values.astype(np.float64)), self.cap)
        w = np.where(np.isnan(w), 1.0, w).astype(np.float32)
        self._by_doc = {d: w[offsets[i]:offsets[i + 1]]
                        for i, d in enumerate(t.column("doc_id").to_pylist())}
        self.seen = 0
        self.scored = 0

    def of(self, spans: list[dict], n_tokens: int, sample_id) -> np.ndarray:
        """The weight of each of a sample's n_tokens tokens, from its spans."""
        out = np.ones(n_tokens, np.float32)
        at = 0
        for sp in spans:
            start, end = int(sp["start"]), int(sp["end"])
            w = self._by_doc.get(sp["doc_id"])
            if w is not None:
                got = w[start:min(end, len(w))]  # index len(w) (the EOS) keeps weight 1
                out[at:at + len(got)] = got
                self.scored += len(got)
            at += end - start
        if at != n_tokens:
            raise TrainError(f"sample {sample_id!r}: its spans cover {at} tokens, it has {n_tokens}")
        self.seen += n_tokens
        return out

    @property
    def coverage(self) -> float:
        """Share of the tokens read so far that had a score."""
        return self.scored / self.seen if self.seen else 0.0
