"""Needle in a haystack: a grid of context lengths x needle depths, built on RULER's niah
machinery (longrecipe.evaluate.haystack) with our depth grid in place of RULER's
random depths.

Each cell is RULER's niah_single task: one needle "One of the special magic
numbers for {key} is: {value}." (an adjective-noun key and a 7-digit number, drawn
as RULER draws them), RULER's one-needle template and answer prefix, the haystack
sized by RULER's length fitter (a binary search over the haystack's units with the
evaluated model's own tokenizer) so that input plus tokens to generate fits the
length. The needle goes where RULER's rules put it for the haystack:

- noise (RULER's `repeat` line, one unit per line): before line
  int(lines x depth / 100);
- essay (RULER's Paul Graham essays) or corpus (the held-out documents), one unit
  per word: after int(sentences x depth / 100) sentences, as in RULER and in
  gkamradt's NIAH (the needle moves back to a sentence boundary).

The prompt is base form (task text plus answer prefix) or chat form (the
tokenizer's chat template), as for RULER.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from longrecipe.evaluate.haystack import (
    NOISE,
    HaystackError,
    PromptFormat,
    TooShort,
    WordHaystack,
    adj_noun,
    fit,
    lines_with_needles,
    needle,
    number,
    wordlist,
)
from longrecipe.evaluate.ruler import NIAH_ANSWER, NIAH_TEMPLATE, singular

__all__ = [
    "ANSWER_PREFIX", "ESSAYS", "NEEDLE", "NOISE", "TEMPLATE", "Haystack", "HaystackError",
    "NiahSample", "corpus_haystack", "depth_grid", "essay_haystack", "min_length",
    "niah_samples", "noise_haystack",
]

NEEDLE = needle("numbers", "{key}", "{value}")
"""One of the special magic numbers for {key} is: {value}."""
TEMPLATE = singular(NIAH_TEMPLATE).replace("{type}", "number").replace("{query}", "{key}")
"""RULER's niah template in its one-needle form, for numbers."""
ANSWER_PREFIX = singular(NIAH_ANSWER).replace("{type}", "number").replace("{query}", "{key}")
ESSAYS = "PaulGrahamEssays.json"


@dataclass(frozen=True)
class NiahSample:
    """One needle-in-a-haystack prompt and its answer."""

    length: int
    """Token budget: input plus tokens to generate."""
    depth: float
    """Requested needle depth, percent of the haystack (0 = start)."""
    index: int
    """Sample number within the (length, depth) cell."""
    prompt: str
    """Full input text, answer prefix included."""
    references: list[str]
    """The needle's value (what the answer must contain)."""
    key: str
    """The needle's key, asked for in the question."""
    n_input_tokens: int
    """Tokens of `prompt` as the model is fed it (longrecipe.tokens.encode)."""
    haystack_units: int
    """Haystack units kept: lines (noise) or words (essay, corpus)."""
    needle_depth: float
    """Where the needle really went: percent of the haystack's lines (noise) or sentences
    (essay, corpus) before it."""


# --------------------------------------------------------------------------- haystacks


@dataclass(frozen=True)
class Haystack:
    """Source text of a haystack: `sep` "\\n" for lines (noise), " " for words."""

    name: str
    text: str
    sep: str = " "

    def repeated(self, n_chars: int) -> str:
        """The first n_chars of the text repeated end to end."""
        reps = max(1, -(-n_chars // (len(self.text) + len(self.sep))))
        return self.sep.join([self.text] * reps)[:n_chars]

    @functools.cached_property
    def words(self) -> WordHaystack:
        return WordHaystack(self.text)


def noise_haystack() -> Haystack:
    return Haystack("noise", NOISE, "\n")


def essay_haystack(data_dir: str | Path) -> Haystack:
    """RULER's essay haystack: every essay, whitespace runs collapsed to one space."""
    path = Path(data_dir) / ESSAYS
    if not path.exists():
        raise HaystackError(
            f"{path} is missing: the essay haystack is fetched at run time, "
            "run `longrecipe data fetch ruler` first"
        )
    try:
        text = json.loads(path.read_text(encoding="utf-8"))["text"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HaystackError(f"{path}: not RULER's essay file (a JSON object with 'text'): {e}") from None
    return Haystack("essay", re.sub(r"\s+", " ", text).strip())


def corpus_haystack(texts: Sequence[str]) -> Haystack:
    """The ingested corpus's held-out documents, one after the other."""
    joined = " ".join(re.sub(r"\s+", " ", t).strip() for t in texts if t.strip())
    if not joined:
        raise HaystackError("the corpus haystack needs held-out documents with text; found none")
    return Haystack("corpus", joined)


# --------------------------------------------------------------------------- grid


def depth_grid(n: int) -> list[float]:
    """n evenly spaced depths from 0 to 100 percent (one depth: the middle)."""
    if n == 1:
        return [50.0]
    return [round(100.0 * i / (n - 1), 4) for i in range(n)]


def niah_samples(
    length: int,
    depths: Sequence[float],
    tokenizer,
    haystack: Haystack,
    *,
    samples: int = 1,
    seed: int = 42,
    max_new_tokens: int = 32,
    prompt_format: str = "base",
) -> list[NiahSample]:
    """Every (depth, sample) prompt at one length, each fitted to the budget."""
    fmt = PromptFormat(prompt_format, tokenizer)
    budget = length - max_new_tokens
    if budget <= 0:
        raise HaystackError(f"niah: token budget {budget} leaves no room for a prompt")
    lines = haystack.sep == "\n"
    hi = 50 * length if lines else 4 * length  # more units than any tokenizer fits
    out, guess = [], None
    for depth in depths:
        for i in range(samples):
            # A string seed is hashed with sha512 by `random`: stable across processes.
            rng = random.Random(f"niah:{seed}:{length}:{depth}:{i}")
            key, value = adj_noun(rng), number(rng)
            build = _builder(fmt, haystack, depth, key, value)
            try:
                guess, prompt, refs, n_tokens = fit(build, fmt.count, budget, 0, hi, guess)
            except TooShort as e:
                raise HaystackError(
                    f"niah: length {length} is too short: the prompt without haystack takes "
                    f"{e.tokens} tokens and {max_new_tokens} are kept for the answer"
                ) from None
            if lines:
                before, total = int(guess * depth / 100), guess
            else:
                before, total = haystack.words.sentences_before(guess, depth)
            out.append(NiahSample(
                length=length, depth=depth, index=i, prompt=prompt, references=refs, key=key,
                n_input_tokens=n_tokens, haystack_units=guess,
                needle_depth=100.0 * before / total if total else 0.0,
            ))
    return out


def _builder(fmt: PromptFormat, haystack: Haystack, depth: float, key: str, value: str):
    nd = NEEDLE.format(key=key, value=value)
    answer = ANSWER_PREFIX.format(key=key)

    def build(n: int) -> tuple[str, list[str]]:
        if haystack.sep == "\n":
            context = lines_with_needles(n, haystack.text, [nd], [int(n * depth / 100)])
        else:
            context = haystack.words.with_needles(n, [nd], [depth])
        return fmt.render(TEMPLATE.format(context=context, key=key), answer), [value]

    return build


def min_length(tokenizer, max_new_tokens: int, prompt_format: str = "base") -> int:
    """The shortest length a NIAH prompt fits in: no haystack, just the template, the
    needle and the question, plus the tokens to generate."""
    fmt = PromptFormat(prompt_format, tokenizer)
    key = "quiet-lantern"
    prompt = fmt.render(TEMPLATE.format(context=NEEDLE.format(key=key, value="1234567"), key=key),
                        ANSWER_PREFIX.format(key=key))
    return fmt.count(prompt) + max_new_tokens


def __getattr__(name: str):
    # The key vocabularies, for scripts that drew keys from them (studies/extension).
    if name == "_ADJECTIVES":
        return wordlist("adjectivelist")
    if name == "_NOUNS":
        return wordlist("nounlist")
    raise AttributeError(name)
