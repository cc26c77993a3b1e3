"""Needle in a haystack: a grid of context lengths x needle depths.

One 7-digit "special magic number" hides in a haystack cut to fit the length
with the evaluated model's own tokenizer; the question comes after the
haystack, followed by an answer prefix (RULER's niah template in its
one-needle form, for base models: no chat template). The needle goes in at
the sentence boundary at or before the requested depth, as in
gkamradt/LLMTest_NeedleInAHaystack; the haystack is cut at a token boundary so
that input plus the tokens to generate fill the length to within a few tokens.

Haystacks: RULER's Paul Graham essays (fetched at run time), the held-out
documents of the ingested corpus, or RULER's noise line repeated.
"""

from __future__ import annotations

import bisect
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's `repeat` haystack line."""
NEEDLE = "One of the special magic numbers for {key} is: {value}."
TEMPLATE = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n{context}\n"
    "What is the special magic number for {key} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic number for {key} mentioned in the provided text is"
ESSAYS = "PaulGrahamEssays.json"

# Keys are adjective-noun pairs like RULER's (which draws them from `wonderwords`);
# a short list of our own is enough, the key only has to be unambiguous.
_ADJECTIVES = (
    "amber brave calm dusty eager faint gentle hollow icy jolly keen lively mellow noble "
    "odd pale quiet rapid silent tidy upper vivid warm young zesty bold crisp deep early "
    "fresh grand humble"
).split()
_NOUNS = (
    "anchor badger candle dolphin engine falcon garden harbor island jacket kettle lantern "
    "meadow needle orchard pepper quarry river saddle tunnel umbrella valley window yacht "
    "zebra beacon cottage ferry glacier hammer"
).split()

# A sentence starts after end punctuation and either whitespace or, glued on, a capital
# letter (the essay file joins paragraphs as "stops.The alarming thing").
_SENTENCE_START = re.compile(r"[.!?][\"')\]]*(?:\s+|(?=[A-Z]))")


class HaystackError(ValueError):
    """A haystack that cannot be built (missing data, empty corpus)."""


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
    """Tokens of `prompt` as the model sees it (special tokens included)."""
    haystack_tokens: int
    """Tokens of haystack kept (before the needle is inserted)."""
    needle_depth: float
    """Where the needle really went: percent of the haystack's tokens before it."""


# --------------------------------------------------------------------------- haystacks


@dataclass(frozen=True)
class Haystack:
    """Source text of a haystack, repeated as needed to reach any length."""

    name: str
    text: str
    sep: str = " "

    def repeated(self, n_chars: int) -> str:
        """The first n_chars of the text repeated end to end."""
        reps = max(1, -(-n_chars // (len(self.text) + len(self.sep))))
        return self.sep.join([self.text] * reps)[:n_chars]


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
) -> list[NiahSample]:
    """Every (depth, sample) prompt at one length, all cut from the same haystack text."""
    fitter = _Fitter(tokenizer, haystack, length - max_new_tokens)
    out = []
    for depth in depths:
        for i in range(samples):
            # A string seed is hashed with sha512 by `random`: stable across processes.
            rng = random.Random(f"niah:{seed}:{length}:{depth}:{i}")
            key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
            value = str(rng.randint(1_000_000, 9_999_999))
            out.append(fitter.sample(length, depth, i, key, value))
    return out


def min_length(tokenizer, max_new_tokens: int) -> int:
    """The shortest length a NIAH prompt fits in: no haystack, just the template, the
    needle and the question, plus the tokens to generate."""
    needle = NEEDLE.format(key="quiet-lantern", value="1234567")
    prompt = TEMPLATE.format(context=needle, key="quiet-lantern")
    prompt += ANSWER_PREFIX.format(key="quiet-lantern")
    return len(tokenizer(prompt)["input_ids"]) + max_new_tokens


class _Fitter:
    """Cuts one haystack to a token budget for many (depth, needle) prompts."""

    def __init__(self, tokenizer, haystack: Haystack, budget: int):
        self.tok, self.budget = tokenizer, budget
        if budget <= 0:
            raise HaystackError(f"niah: token budget {budget} leaves no room for a prompt")
        sample = haystack.repeated(20_000)
        chars_per_token = len(sample) / max(1, len(self._ids(sample, special=False)))
        text = haystack.repeated(int(budget * chars_per_token * 1.3) + 1000)
        enc = self._encode_offsets(text)
        while len(enc) < budget:  # a tokenizer denser than the sample suggested
            text = haystack.repeated(len(text) * 2)
            enc = self._encode_offsets(text)
        self.text, self.ends = text, enc
        self.starts = [0] + [m.end() for m in _SENTENCE_START.finditer(text)]

    def _ids(self, text: str, special: bool = True) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def _encode_offsets(self, text: str) -> list[int]:
        """End character of each token of `text`."""
        try:
            offsets = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
            return [e for _, e in offsets]
        except (NotImplementedError, KeyError, ValueError):
            # Slow tokenizers give no offsets: spread the characters evenly instead.
            n = len(self._ids(text, special=False))
            return [round((i + 1) * len(text) / n) for i in range(n)]

    def _render(self, k: int, depth: float, key: str, value: str) -> tuple[str, float]:
        context = self.text[: self.ends[k - 1]] if k else ""
        # Token j sits at the requested depth; the needle goes at the last sentence
        # start at or before it.
        j = round(k * depth / 100)
        char = len(context) if j >= k else (self.ends[j - 1] if j else 0)
        b = self.starts[bisect.bisect_right(self.starts, char) - 1] if context else 0
        needle = NEEDLE.format(key=key, value=value)
        sep = "\n" if b and context[b - 1] == "\n" else " "
        if b >= len(context):
            context = (context.rstrip() + sep if context.strip() else "") + needle
        else:
            lead = "" if b == 0 or context[b - 1].isspace() else " "
            context = context[:b] + lead + needle + sep + context[b:]
        tokens_before = bisect.bisect_left(self.ends, b) if b else 0
        realised = 100.0 * tokens_before / k if k else 0.0
        prompt = TEMPLATE.format(context=context, key=key) + ANSWER_PREFIX.format(key=key)
        return prompt, realised

    def sample(self, length: int, depth: float, index: int, key: str, value: str) -> NiahSample:
        def count(k: int) -> tuple[int, str, float]:
            prompt, realised = self._render(k, depth, key, value)
            return len(self._ids(prompt)), prompt, realised

        n0, _, _ = count(0)
        if n0 > self.budget:
            raise HaystackError(
                f"niah: length {length} is too short: the prompt without haystack takes {n0} "
                f"tokens and {length - self.budget} are kept for the answer"
            )
        # Newton-like steps on the token count (it moves almost one for one with k);
        # merges at the seams can make it off by a few, hence the loop.
        best, k, seen = 0, min(len(self.ends), self.budget - n0), set()
        while k not in seen:
            seen.add(k)
            n, _, _ = count(k)
            if n <= self.budget:
                best = max(best, k)
            if n == self.budget:
                break
            k = max(0, min(len(self.ends), k + self.budget - n))
        n, prompt, realised = count(best)
        return NiahSample(
            length=length, depth=depth, index=index, prompt=prompt, references=[value],
            key=key, n_input_tokens=n, haystack_tokens=best, needle_depth=realised,
        )
