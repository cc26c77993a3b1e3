"""Greedy decoding for evaluation: batched prefill with left padding, then one token
per step from the KV cache.

Every call passes the attention mask and the position ids explicitly
(shared/ML_NOTES.md: transformers misreads position ids without a mask). Positions
are counted from the mask, so a left-padded prompt gets the same positions
0..n-1 as it would alone, and batched output equals unbatched output.

Only the torch-free helpers are at module level; torch is imported in the
functions that run the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Generated:
    """One prompt's greedy continuation."""

    token_ids: list[int]
    """Generated ids, the stop token included."""
    text: str
    """Decoded continuation, special tokens dropped."""
    stop: str
    """Why it ended: `eos`, `newline` or `length`."""
    n_input_tokens: int
    """Prompt tokens fed to the model (special tokens included)."""
    seconds: float
    """This prompt's share of its batch's wall time."""


class StopRule:
    """Decides, token by token, when a row is finished.

    EOS always stops. With `newline=True` a newline stops too, but only once the row
    has produced some non-blank text: a model that opens its answer with a line break
    is not cut off before it says anything.
    """

    def __init__(self, tokenizer, eos_ids: Iterable[int], newline: bool):
        self.tok, self.eos, self.newline = tokenizer, frozenset(eos_ids), newline
        self._pieces: dict[int, str] = {}

    def _piece(self, tid: int) -> str:
        if tid not in self._pieces:
            self._pieces[tid] = self.tok.decode([tid], skip_special_tokens=False)
        return self._pieces[tid]

    def check(self, tid: int, had_text: bool) -> tuple[str | None, bool]:
        """(why it stops or None, whether the row has non-blank text after this token)."""
        if tid in self.eos:
            return "eos", had_text
        piece = self._piece(tid)
        head, nl, _ = piece.partition("\n")
        if self.newline and nl and (had_text or head.strip()):
            return "newline", True
        return None, had_text or bool(piece.strip())


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a sequence: the tokenizer's and the model's generation config's."""
    ids: set[int] = set()
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return ids


def _cache_arg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def greedy(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    pad_id: int,
    stop: StopRule | None = None,
) -> list[tuple[list[int], str]]:
    """Greedy continuation of a batch of token-id prompts: [(new ids, stop reason)].

    Prefill runs once over the left-padded batch, keeping only the last position's
    logits; each further step feeds one token per row with the grown mask and the
    row's next position. Finished rows ride along (their tokens are ignored) until
    every row is done or `max_new_tokens` is reached.
    """
    import torch

    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy: every prompt needs at least one token")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg = _cache_arg(model)

    out_ids: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    done = [False] * len(prompts)
    had_text = [False] * len(prompts)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    logits_to_keep=1)
        next_pos = pos[:, -1:] + 1
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            for i, tid in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                out_ids[i].append(tid)
                if stop is not None:
                    why, had_text[i] = stop.check(tid, had_text[i])
                    if why:
                        done[i], reasons[i] = True, why
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                        use_cache=True, **{cache_arg: _cache_of(out)})
            next_pos = next_pos + 1
    return list(zip(out_ids, reasons, strict=True))


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    stop_at_newline: bool,
    batch_size: int = 1,
    on_batch=None,
) -> list[Generated]:
    """Greedy continuations of text prompts, in batches of similar length.

    Prompts are tokenized as the model would see them alone, by the pipeline's one BOS
    rule (longrecipe.tokens.encode: a BOS where the tokenizer adds one, never twice). `on_batch(n, seconds)` is called after
    each batch (progress and timing).
    """
    import time

    from longrecipe.tokens import encode

    encoded = [encode(tokenizer, p) for p in prompts]
    stop = StopRule(tokenizer, eos_ids(model, tokenizer), stop_at_newline)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Sorting by length keeps padding small; results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[Generated | None] = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        t0 = time.perf_counter()
        outs = greedy(model, [encoded[i] for i in idx], max_new_tokens, pad_id=pad, stop=stop)
        seconds = time.perf_counter() - t0
        for i, (new, why) in zip(idx, outs, strict=True):
            text = tokenizer.decode(new, skip_special_tokens=True)
            results[i] = Generated(new, text, why, len(encoded[i]), seconds / len(idx))
        if on_batch is not None:
            on_batch(len(idx), seconds)
    return [r for r in results if r is not None]
