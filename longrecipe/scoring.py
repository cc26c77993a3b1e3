"""Scoring documents for the analysis: the model passes each method needs, run through
the shared log-prob primitive (longrecipe.logprobs.score_windows, the model's own output
head), and the reference model of logit_delta.

`Scorer.score(docs)` returns one `Scores` per document, arrays aligned with its
input_ids: log-probs of the long pass (and the reference's, or the short pass's),
the score, per-occurrence flags (`select_impactful`) and the context each token had.
The stage (longrecipe.analyze) turns them into type statistics and sentence flags.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from longrecipe.config import AnalyzeConfig, RopeConfig, RuntimeConfig
from longrecipe.errors import InputError
from longrecipe.models import ModelSource, is_cuda, load_model, load_tokenizer, pick_device
from longrecipe.selection import select_impactful


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


class Scorer:
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
        dtype = torch.bfloat16 if is_cuda(self.device) else torch.float32
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


