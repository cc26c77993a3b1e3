"""Per-token log-probabilities of documents under a causal LM, in batched windows.

Two passes, both planned as windows over a document and run by `score_windows`:

- the long pass (`long_windows`): the whole document when it fits in
  `max_context`, else overlapping chunks of `max_context` tokens, each chunk
  after the first scoring only the tokens the previous one did not reach, so
  every such token still sees at least `min_context` tokens;
- the short pass (`short_windows`, LongPPL): windows of `W + 1` tokens, each
  scoring its last `S` tokens, so a target sees between `W - S + 1` and `W`
  tokens of context.

A window is forwarded with positions 0..len-1, an explicit attention mask
and explicit position ids (transformers treats position ids with gaps and no
mask as packed sequences). Only the positions a window scores go through the
output head, in chunks, and only the target's log-probability is kept
(`gather_logprobs`), so the full [tokens, vocab] log-softmax never exists. The
head is the model's own output path (longrecipe.head: its soft-capping or logit
scaling included, checked against its forward), shared with perplexity.
This module imports torch; import it from stage code only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from longrecipe.head import forward_hidden, output_head

# Elements of one logits chunk (fp32: 128 MiB); bounds memory whatever the vocabulary.
LOGITS_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class Window:
    """Forward doc[start:end] at positions 0..end-start-1; score tokens start+score_from..end-1."""

    doc: int
    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start


def long_windows(doc: int, n: int, max_context: int, min_context: int) -> list[Window]:
    """Chunks of at most max_context tokens covering [0, n); token i of a chunk gets i tokens
    of context, and every token scored after the first chunk gets at least min_context."""
    if n <= max_context:
        return [Window(doc, 0, n, 1)] if n > 1 else []
    stride = max_context - min_context
    starts = [*range(0, n - max_context, stride), n - max_context]
    out, covered = [], 0
    for s in starts:
        out.append(Window(doc, s, s + max_context, max(covered - s, 1)))
        covered = s + max_context
    return out


def short_windows(doc: int, n: int, window: int, stride: int) -> list[Window]:
    """LongPPL's short pass for the targets t > window (those with t <= window already see
    their whole prefix in a window of `window` tokens, so their short log-prob is the long one)."""
    out = []
    for a in range(window + 1, n, stride):
        start = a + stride - 1 - window
        out.append(Window(doc, start, min(a + stride, n), window - stride + 1))
    return out


def gather_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """log softmax(head(hidden))[target] for each row of `hidden` [n, d], in fp32, one chunk
    of rows at a time. `head` is the model's own output path (longrecipe.head), so
    soft-capping and logit scaling are those of the model's forward."""
    n = hidden.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    if chunk is None:
        chunk = max(16, LOGITS_CHUNK_ELEMENTS // getattr(head, "vocab_size", 1 << 16))
    for s in range(0, n, chunk):
        logits = head(hidden[s : s + chunk]).float()
        tgt = targets[s : s + chunk, None]
        picked = logits.gather(-1, tgt) - torch.logsumexp(logits, -1, keepdim=True)
        out[s : s + chunk] = picked[:, 0]
    return out


def score_windows(
    model,
    docs: Sequence[np.ndarray],
    windows: Sequence[Window],
    *,
    batch_tokens: int,
    device: str | torch.device = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Run every window through `model`; return per document (logprob, context): float32 log-probs
    (NaN where no window scored the token) and int32 context lengths (-1 where not scored).

    Windows are sorted by length and packed, right-padded, into forward passes of at most
    `batch_tokens` padded tokens (a longer window runs alone). `on_batch(n)` gets the number
    of real tokens forwarded after each pass.
    """
    logprob = [np.full(len(d), np.nan, dtype=np.float32) for d in docs]
    context = [np.full(len(d), -1, dtype=np.int32) for d in docs]
    head = output_head(model)
    order = sorted(windows, key=lambda w: -w.length)
    i = 0
    with torch.inference_mode():
        while i < len(order):
            width = order[i].length
            batch = order[i : i + max(1, batch_tokens // width)]
            i += len(batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, w in enumerate(batch):
                ids[r, : w.length] = torch.from_numpy(docs[w.doc][w.start : w.end].astype(np.int64))
                mask[r, : w.length] = 1
            pos = torch.arange(width).expand(len(batch), width)
            ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
            hidden = forward_hidden(model, ids, pos, mask)
            # Target j of a row is predicted from hidden state j-1.
            rows = [np.full(w.length - w.score_from, r) for r, w in enumerate(batch)]
            cols = [np.arange(w.score_from, w.length) for w in batch]
            r_t = torch.from_numpy(np.concatenate(rows)).to(device)
            j_t = torch.from_numpy(np.concatenate(cols)).to(device)
            lp = gather_logprobs(hidden[r_t, j_t - 1], ids[r_t, j_t], head)
            lp = lp.cpu().numpy()
            k = 0
            for w in batch:
                m = w.length - w.score_from
                logprob[w.doc][w.start + w.score_from : w.end] = lp[k : k + m]
                context[w.doc][w.start + w.score_from : w.end] = np.arange(w.score_from, w.length)
                k += m
            if on_batch is not None:
                on_batch(int(sum(w.length for w in batch)))
    return logprob, context


def window_tokens(windows: Sequence[Window]) -> int:
    """Tokens a list of windows forwards (the cost of a pass)."""
    return int(sum(w.length for w in windows))
