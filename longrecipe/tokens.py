"""One rule for special tokens, the tokenizer's own, shared by every stage.

- BOS: a text is encoded as the tokenizer encodes it by default, which for
  Llama-3, Mistral and Gemma tokenizers means a leading BOS and for Qwen or
  SmolLM2 none. Only the BOS is taken from the tokenizer's defaults (a tokenizer
  configured to append EOS does not get it on a prompt). Ingest (so analysis and
  training), perplexity and evaluation prompts all encode through `encode`, so
  a model sees the same start of text everywhere.
- EOS: build inserts the tokenizer's EOS after every packed document
  (`TokenPolicy.eos_token_id`, recorded in the documents manifest).

A chat prompt (a chat template rendered as text) usually carries its own BOS
text; `encode` adds the BOS id only when the encoded text does not already
start with it, so neither form ends up with two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

_PROBE = "a"


@dataclass(frozen=True)
class TokenPolicy:
    """A tokenizer's special-token rule as the pipeline applies it."""

    bos_token_id: int | None
    adds_bos: bool
    """The tokenizer puts BOS in front of a text it encodes with its defaults."""
    eos_token_id: int | None

    def as_info(self) -> dict:
        """The form recorded in manifests."""
        return asdict(self)


def token_policy(tok) -> TokenPolicy:
    """The policy of `tok`, measured on a probe text (cached on the tokenizer object)."""
    cached = getattr(tok, "_longrecipe_token_policy", None)
    if cached is not None:
        return cached
    bos = tok.bos_token_id
    plain = tok(_PROBE, add_special_tokens=False)["input_ids"]
    full = tok(_PROBE, add_special_tokens=True)["input_ids"]
    adds = bos is not None and len(full) > len(plain) and full[0] == bos
    policy = TokenPolicy(bos, adds, tok.eos_token_id)
    try:
        tok._longrecipe_token_policy = policy
    except AttributeError:  # a tokenizer that refuses attributes: recompute each time
        pass
    return policy


def encode(tok, text: str) -> list[int]:
    """`text` as the model is fed it: its tokens, after a BOS when the tokenizer adds one
    (and the text does not already begin with it, as a rendered chat template does)."""
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    policy = token_policy(tok)
    if policy.adds_bos and (not ids or ids[0] != policy.bos_token_id):
        ids = [policy.bos_token_id, *ids]
    return list(ids)
