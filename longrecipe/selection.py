"""Which tokens and sentences are impactful, from the analysis scores.

Two units (AnalyzeConfig.unit):

- `type`, the paper's: a token id's scores are averaged over the whole corpus
  (`TypeStats`); the types with at least `min_type_count` scored occurrences are
  ranked by that mean and the top `top_fraction` of them (or those above a
  threshold) are impactful types (`impactful_types`). Every occurrence of an
  impactful type is an impactful token.
- `occurrence`: each token by its own score, within its document
  (`select_impactful`): the top fraction of the document, or a threshold (LongPPL).

Sentences (`flag_sentences`): a sentence's share of impactful tokens ranks it; the
top `sentence_fraction` of all analysed sentences are flagged (a sentence without
any impactful token never is). The flagged share is therefore a setting, not a
consequence of sentence length: under "any impactful token" a 20-token sentence
escapes a 20% selection with probability 0.8^20, and ~99% of sentences were
flagged.
"""

from __future__ import annotations

import math

import numpy as np

from longrecipe.config import AnalyzeConfig


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


class TypeStats:
    """Per token id over the corpus: occurrences, scored occurrences, sums of score and
    log-prob (arrays indexed by token id, grown as larger ids appear)."""

    def __init__(self) -> None:
        self.count = np.zeros(0, np.int64)
        self.n_scored = np.zeros(0, np.int64)
        self.score_sum = np.zeros(0, np.float64)
        self.logprob_sum = np.zeros(0, np.float64)
        self.has_logprob = False

    def add(self, ids: np.ndarray, score: np.ndarray, logprob: np.ndarray | None) -> None:
        """One batch of tokens: ids (int), score (NaN where unscored), logprob or None."""
        ids = ids.astype(np.int64)
        size = max(len(self.count), int(ids.max()) + 1 if len(ids) else 0)
        for name in ("count", "n_scored", "score_sum", "logprob_sum"):
            a = getattr(self, name)
            setattr(self, name, np.pad(a, (0, size - len(a))))
        ok = np.isfinite(score)
        self.count += np.bincount(ids, minlength=size)
        self.n_scored += np.bincount(ids[ok], minlength=size)
        self.score_sum += np.bincount(ids[ok], weights=score[ok].astype(np.float64), minlength=size)
        if logprob is not None:
            self.has_logprob = True
            lp_ok = ok & np.isfinite(logprob)
            self.logprob_sum += np.bincount(
                ids[lp_ok], weights=logprob[lp_ok].astype(np.float64), minlength=size
            )

    @property
    def size(self) -> int:
        return len(self.count)

    def mean_score(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_scored > 0, self.score_sum / self.n_scored, np.nan)

    def mean_logprob(self) -> np.ndarray:
        if not self.has_logprob:
            return np.full(self.size, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_scored > 0, self.logprob_sum / self.n_scored, np.nan)


def impactful_types(stats: TypeStats, cfg: AnalyzeConfig) -> tuple[np.ndarray, dict]:
    """Boolean per token id: the type is impactful (the paper's rule, see the module
    docstring), plus facts for the manifest."""
    mean = stats.mean_score()
    eligible = np.flatnonzero((stats.n_scored >= cfg.min_type_count) & np.isfinite(mean))
    out = np.zeros(stats.size, bool)
    sel = cfg.effective_selection
    if sel == "top_fraction":
        k = math.ceil(cfg.top_fraction * len(eligible))
        order = np.argsort(-mean[eligible], kind="stable")[:k]  # ties: lower id first
        out[eligible[order]] = True
    elif cfg.method == "lsd":
        lp = stats.mean_logprob()
        out[eligible] = (mean[eligible] > cfg.lsd_alpha) & (lp[eligible] > cfg.lsd_beta)
    else:
        out[eligible] = mean[eligible] > cfg.threshold
    facts = {
        "types_seen": int((stats.count > 0).sum()),
        "types_eligible": len(eligible),
        "impactful_types": int(out.sum()),
        "min_type_count": cfg.min_type_count,
        "impactful_type_mean_score_min": (
            round(float(mean[out].min()), 6) if out.any() else None
        ),
    }
    return out, facts


def sentence_counts(flags: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Impactful tokens in each sentence of one document (`ends`: exclusive ends)."""
    if len(ends) == 0:
        return np.zeros(0, np.int64)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return np.add.reduceat(flags.astype(np.int64), starts) if len(flags) else np.zeros(
        len(ends), np.int64
    )


def flag_sentences(n_impactful: np.ndarray, n_tokens: np.ndarray, fraction: float) -> np.ndarray:
    """The top `fraction` of sentences (rounded up) by share of impactful tokens, then by
    impactful tokens, then in corpus order; never a sentence without one."""
    share = n_impactful / np.maximum(n_tokens, 1)
    k = math.ceil(fraction * len(share))
    cand = np.flatnonzero(n_impactful > 0)
    order = np.lexsort((cand, -n_impactful[cand], -share[cand]))
    out = np.zeros(len(share), bool)
    out[cand[order[:k]]] = True
    return out
