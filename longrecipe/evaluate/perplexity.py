"""Perplexity of held-out documents: by context length, and at one short length
(retention: what a long-context model keeps of its short-context ability).

A document of at least L tokens is scored on its first L tokens in one forward
pass with full causal attention: perplexity = exp(mean negative log-likelihood
of tokens 2..L). The decoder's hidden states go through the LM head in chunks,
so a long context never materialises an L x vocab logits tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Scored:
    """One document window's perplexity."""

    doc_index: int
    """Position of the document among the held-out documents used."""
    perplexity: float
    n_tokens: int
    """Tokens in the window (targets: one fewer)."""
    seconds: float
    """This window's share of its batch's wall time."""


def windows(docs: Sequence[Sequence[int]], length: int) -> list[tuple[int, list[int]]]:
    """(doc index, first `length` tokens) for every document that has that many."""
    return [(i, list(ids[:length])) for i, ids in enumerate(docs) if len(ids) >= length]


def perplexities(
    model, items: Sequence[tuple[int, Sequence[int]]], *, batch_size: int = 1, on_batch=None
) -> list[Scored]:
    """Perplexity of each (doc index, ids) window; windows of one call share a length."""
    import time

    out = []
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        t0 = time.perf_counter()
        nll = mean_nll(model, [ids for _, ids in chunk])
        seconds = time.perf_counter() - t0
        for (i, ids), v in zip(chunk, nll, strict=True):
            out.append(Scored(i, math.exp(v), len(ids), seconds / len(chunk)))
        if on_batch is not None:
            on_batch(len(chunk), seconds)
    return out


def mean_nll(model, batch: Sequence[Sequence[int]], chunk: int | None = None) -> list[float]:
    """Mean next-token negative log-likelihood (nats) of each equal-length sequence, through
    the model's own output path in chunks (longrecipe.logprobs.gather_logprobs)."""
    import torch

    from longrecipe.head import forward_hidden, output_head
    from longrecipe.logprobs import gather_logprobs

    lengths = {len(x) for x in batch}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError("mean_nll: sequences of one batch need one common length >= 2")
    device = next(model.parameters()).device
    ids = torch.as_tensor([list(x) for x in batch], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)  # explicit mask: see ML_NOTES on position ids
    pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
    head = output_head(model)
    with torch.inference_mode():
        hidden = forward_hidden(model, ids, pos, mask)
        b, n = ids.shape[0], ids.shape[1] - 1
        lp = gather_logprobs(hidden[:, :-1].reshape(b * n, -1), ids[:, 1:].reshape(-1), head,
                             chunk=chunk)
    return (-lp.double().view(b, n).mean(-1)).tolist()
