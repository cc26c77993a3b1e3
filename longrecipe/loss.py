"""The training loss without logits for the whole sequence.

A causal LM's own loss builds [tokens, vocab] logits, their fp32 copy and their
gradient: for 24k tokens and Llama-3's 128k vocabulary that is 12 GB per copy in fp32.
Here the decoder's last hidden states (longrecipe.head.forward_hidden) go through the
model's own output head (longrecipe.head.output_head: its soft-capping and logit
scaling included) a chunk of rows at a time; each chunk's cross-entropy is summed and
the chunk is recomputed in backward (torch.utils.checkpoint), so at most one chunk of
logits exists at any moment, forward or backward. The result equals the plain loss and
its gradients up to float rounding (tests/test_loss.py: 1e-5 in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from longrecipe.batches import IGNORE_INDEX


def chunked_nll_sum(hidden: torch.Tensor, targets: torch.Tensor, head, chunk_tokens: int,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over label tokens of -log p(target | hidden state), in fp32; with `weights`
    (aligned with targets) each token's term is multiplied by its weight (LongCE).

    hidden [..., d] and targets [...] are aligned (targets[t] is what hidden[t]
    predicts, IGNORE_INDEX where nothing); `head` maps hidden -> logits.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    w = weights.reshape(-1) if weights is not None else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, t.numel(), chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        args = (h[rows], t[rows], head) if w is None else (h[rows], t[rows], head, w[rows])
        fn = _nll_sum if w is None else _weighted_nll_sum
        if torch.is_grad_enabled() and h.requires_grad:
            part = checkpoint(fn, *args, use_reentrant=False)
        else:
            part = fn(*args)
        total = total + part
    return total


def full_nll_sum(hidden: torch.Tensor, targets: torch.Tensor, head,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """The same sum from logits of every row at once (the reference the chunks must equal)."""
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    return _nll_sum(h, t, head) if weights is None else _weighted_nll_sum(h, t, head, weights.reshape(-1))


def _nll_sum(h: torch.Tensor, t: torch.Tensor, head) -> torch.Tensor:
    logits = head(h)
    return F.cross_entropy(logits.float(), t, ignore_index=IGNORE_INDEX, reduction="sum")


def _weighted_nll_sum(h: torch.Tensor, t: torch.Tensor, head, w: torch.Tensor) -> torch.Tensor:
    logits = head(h)
    nll = F.cross_entropy(logits.float(), t, ignore_index=IGNORE_INDEX, reduction="none")
    return (nll * w.float()).sum()
