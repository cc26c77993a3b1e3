"""The model's own output path, hidden states -> logits, for code that runs the head
in chunks.

Scoring (analysis, perplexity) and the training loss never build [tokens, vocab]
logits for a whole sequence: they take the decoder's last hidden states and push a
few rows at a time through the output head. That is right only if the head does
exactly what the model's forward does with those states: `lm_head`, then whatever
the architecture applies to the logits (Gemma-2/3 soft-capping, Cohere's
`logit_scale`, Granite's `logits_scaling`, Falcon-H1's `lm_head_multiplier`).

`output_head(model)` returns that function and checks it once against the model's
own forward on a short probe; an architecture whose logits it does not reproduce is
refused with its class name, never scored wrongly. `forward_hidden` runs the full
model (so DDP, FSDP and DeepSpeed hooks on the root module fire) with no logits at
all and returns the decoder's last hidden states.

This module imports torch; import it from stage code only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from longrecipe.models import ModelError

# Relative tolerance of the probe check: the head re-applied outside the forward
# must give the forward's logits up to rounding of the model's dtype.
_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_PROBE_TOKENS = 8


class OutputHead:
    """hidden [..., d] -> logits [..., vocab] exactly as the model's forward computes them."""

    def __init__(self, model):
        cfg = getattr(model.config, "text_config", None) or model.config
        self.module = model.get_output_embeddings()
        if self.module is None:
            raise ModelError(f"{type(model).__name__} has no output embeddings: it cannot be scored")
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        scale = 1.0
        if getattr(cfg, "logit_scale", None) is not None:  # Cohere
            scale *= float(cfg.logit_scale)
        if getattr(cfg, "logits_scaling", None) is not None:  # Granite
            scale /= float(cfg.logits_scaling)
        decoder = model.get_decoder()
        if getattr(decoder, "lm_head_multiplier", None) is not None:  # Falcon-H1
            scale *= float(decoder.lm_head_multiplier)
        self.scale = scale
        self.model_class = type(model).__name__

    @property
    def vocab_size(self) -> int:
        w = getattr(self.module, "weight", None)
        return int(w.shape[0]) if w is not None else 1 << 16

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def output_head(model, *, check: bool = True) -> OutputHead:
    """The model's output path; with check=True (once per model object) it is compared
    with the model's own forward on a probe and refused when it differs."""
    head = OutputHead(model)
    if check and not getattr(model, "_longrecipe_head_checked", False):
        _check(model, head)
        model._longrecipe_head_checked = True
    return head


def forward_hidden(model, input_ids, position_ids, attention_mask, decoder=None, **kwargs):
    """The decoder's last hidden states [batch, seq, d] from a call of the full model
    that computes no logits (`logits_to_keep` is an empty index).

    `decoder` is the unwrapped model's decoder (pass it when `model` is wrapped by DDP,
    FSDP or DeepSpeed); the states are taken by a forward hook on it, so the wrapper's
    own forward runs as in any training step.
    """
    if decoder is None:
        decoder = model.get_decoder()
    seen: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        seen.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    hook = decoder.register_forward_hook(keep)
    try:
        model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
            logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),
            **kwargs,
        )
    except TypeError as e:
        if "logits_to_keep" not in str(e):
            raise
        raise ModelError(
            f"{type(model).__name__}: its forward takes no `logits_to_keep`, so it cannot be "
            "run without computing every logit; this architecture is not supported for "
            "chunked scoring"
        ) from None
    finally:
        hook.remove()
    if len(seen) != 1:
        raise ModelError(
            f"{type(model).__name__}: its decoder ran {len(seen)} times in one forward; "
            "hidden states cannot be taken from it"
        )
    return seen[0]


def _check(model, head: OutputHead) -> None:
    vocab = head.vocab_size
    device = head.module.weight.device if hasattr(head.module, "weight") else "cpu"
    ids = (torch.arange(_PROBE_TOKENS, device=device) * 7919 + 3) % max(vocab, 1)
    ids = ids[None]
    pos = torch.arange(_PROBE_TOKENS, device=device)[None]
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
            got = head(forward_hidden(model, ids, pos, mask))
    finally:
        model.train(was_training)
    want, got = want.float(), got.float()
    tol = _PROBE_TOLERANCE.get(head.module.weight.dtype, 2e-2)
    err = (want - got).abs().max().item()
    if got.shape != want.shape or not math.isfinite(err) or err > tol * max(1.0, want.abs().max().item()):
        raise ModelError(
            f"{head.model_class}: its logits are not lm_head(hidden) with a known scaling "
            f"(max difference {err:.3g} on a probe), so its token log-probabilities cannot be "
            "computed in chunks; this architecture is not supported"
        )


HiddenToLogits = Callable[[torch.Tensor], torch.Tensor]
