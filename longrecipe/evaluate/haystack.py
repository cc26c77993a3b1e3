"""RULER's needle-in-a-haystack machinery, shared by the RULER tasks (ruler.py) and our
NIAH grid (niah.py): one needle generator, the haystacks, the sentence splitter,
the length fitter and the prompt forms.

- Needles: "One of the special magic {type} for {key} is: {value}." with keys and
  values drawn as RULER draws them: adjective-noun pairs from `wonderwords`,
  7-digit numbers, uuid4 strings, from a seeded `random.Random`.
- Haystacks: RULER's noise line repeated (`lines`), a text cut into words
  (`WordHaystack`: RULER's essays, or a corpus), with sentence ends found by
  `sentence_ends`; RULER's essay rule puts a needle after
  int(sentences x depth / 100) sentences.
- Fitting (`fit`): the largest haystack size whose prompt, tokenized by the
  evaluated model's tokenizer, fits the budget, found by a binary search as
  RULER's: bracketed by galloping from a guess (the previous sample's answer), then
  bisected, so the answer k fits and k + 1 does not (or k is the largest allowed).
- Prompt forms (`PromptFormat`): `base`, the task text followed by the answer
  prefix (RULER's base models); `chat`, the task text as the user turn of the
  tokenizer's chat template, followed by the answer prefix (RULER's chat models).
"""

from __future__ import annotations

import bisect
import functools
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from longrecipe.errors import InputError
from longrecipe.tokens import encode

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's `repeat` haystack line."""
NEEDLE = "One of the special magic {type} for {key} is: {value}."
DEPTHS = tuple(round(100 * i / 39) for i in range(40))
"""RULER's needle depths: 40 evenly spaced percentages, rounded."""


class HaystackError(InputError):
    """A haystack or prompt that cannot be built (missing data, no room, no chat template)."""


# --------------------------------------------------------------------------- needles


@functools.cache
def wordlist(name: str) -> tuple[str, ...]:
    """A wonderwords list (`nounlist`, `adjectivelist`, `verblist`), sorted and deduplicated."""
    from importlib import resources

    try:
        text = resources.files("wonderwords").joinpath(f"assets/{name}.txt").read_text("utf-8")
    except ModuleNotFoundError:
        raise HaystackError(
            "RULER's word lists come from the `wonderwords` package: pip install wonderwords"
        ) from None
    return tuple(sorted({w.strip() for w in text.splitlines() if w.strip()}))


def adj_noun(rng: random.Random) -> str:
    # Uniform over all adjective-noun pairs, as RULER's list of every pair is.
    return f"{rng.choice(wordlist('adjectivelist'))}-{rng.choice(wordlist('nounlist'))}"


def number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


DRAW: dict[str, Callable[[random.Random], str]] = {
    "words": adj_noun, "numbers": number, "uuids": uuid4,
}


def distinct(draw: Callable[[], str], k: int) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        if (x := draw()) not in out:
            out.append(x)
    return out


def needle(value_type: str, key: str, value: str) -> str:
    return NEEDLE.format(type=value_type, key=key, value=value)


# --------------------------------------------------------------------------- haystacks


def lines_with_needles(n: int, line: str, needles: Sequence[str], at: Sequence[int]) -> str:
    """n copies of `line` joined by newlines, needle j inserted before line at[j] (at[j] <= n;
    the insertions are made from the largest index down, as RULER does)."""
    lines = [line] * n
    for i, nd in sorted(zip(at, needles, strict=True), key=lambda x: -x[0]):
        lines.insert(i, nd)
    return "\n".join(lines)


class WordHaystack:
    """A text as RULER uses its essays: whitespace-split words, then sentences. A text
    shorter than asked for is repeated end to end (the corpus haystack)."""

    def __init__(self, text: str):
        self._base = re.sub(r"\s+", " ", text).strip().split(" ")
        if not self._base or self._base == [""]:
            raise HaystackError("a word haystack needs some text; found none")
        self.words: list[str] = list(self._base)
        self.ends = sentence_ends(self.words)

    def ensure(self, n: int) -> None:
        """Make at least n words available (repeating the text)."""
        if len(self.words) >= n:
            return
        while len(self.words) < n:
            self.words += self._base
        self.ends = sentence_ends(self.words)

    def with_needles(self, n: int, needles: Sequence[str], depths: Sequence[float]) -> str:
        """The first n words with each needle after int(sentences x depth / 100) sentences
        (a prefix cut inside a sentence counts it as its last sentence)."""
        self.ensure(n)
        ends = self.ends[: bisect.bisect_left(self.ends, n)] + [n]
        at = sorted(int(len(ends) * (d / 100)) for d in depths)  # sentences before the needle
        parts: list[str] = []
        prev = 0
        for pos, nd in zip(at, needles, strict=True):
            cut = ends[pos - 1] if pos else 0
            parts += self.words[prev:cut]
            parts.append(nd)
            prev = cut
        parts += self.words[prev:n]
        return " ".join(parts)

    def sentences_before(self, n: int, depth: float) -> tuple[int, int]:
        """(sentences before a needle at `depth`, sentences) in the first n words."""
        self.ensure(n)
        count = len(self.ends[: bisect.bisect_left(self.ends, n)]) + 1
        return int(count * depth / 100), count


_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "jr", "sr", "prof", "inc", "no", "cf"}
)
_OPENS_SENTENCE = re.compile(r"[\"'“‘(\[]*[A-Z0-9]")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)+")


def sentence_ends(words: list[str]) -> list[int]:
    """Word indices where a sentence ends (exclusive): a word ending in . ! or ? (before
    closing quotes) followed by a capital or digit, abbreviations and initials excepted.
    RULER uses NLTK's punkt here; this rule avoids NLTK and its data download."""
    ends = []
    for i in range(len(words) - 1):
        core = words[i].rstrip("\"')]”’")
        if not core.endswith((".", "!", "?")) or not _OPENS_SENTENCE.match(words[i + 1]):
            continue
        if core.endswith(".") and (
            core[:-1].lower() in _ABBREVIATIONS or _INITIALS.fullmatch(core)
        ):
            continue
        ends.append(i + 1)
    return ends


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptFormat:
    """How a task's text becomes the model's input (see the module docstring)."""

    kind: str
    tokenizer: object

    def __post_init__(self) -> None:
        if self.kind not in ("base", "chat"):
            raise HaystackError(f"prompt format {self.kind!r}: choose base or chat")
        if self.kind == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise HaystackError(
                "evaluate.prompt_format=chat: the evaluated model's tokenizer has no chat "
                "template (a base model: use prompt_format base)"
            )

    def render(self, task: str, answer_prefix: str,
               examples: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt for `task`, after worked examples given as (task, answer) turns."""
        if self.kind == "base":
            return "".join(f"{u}{a}\n" for u, a in examples) + task + answer_prefix
        messages = []
        for u, a in examples:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": task})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        return text + answer_prefix

    def count(self, text: str) -> int:
        """Tokens the model is fed for `text` (longrecipe.tokens.encode: the tokenizer's BOS
        rule, once)."""
        return len(encode(self.tokenizer, text))


# --------------------------------------------------------------------------- fitting

Build = Callable[[int], tuple[str, list[str]]]
"""Haystack size -> (input text, references); the text must grow with the size."""


class TooShort(Exception):
    def __init__(self, tokens: int):
        self.tokens = tokens


def fit(
    build: Build, count: Callable[[str], int], budget: int, lo: int, hi: int,
    guess: int | None = None,
) -> tuple[int, str, list[str], int]:
    """The largest size k in [lo, hi] with count(build(k)) <= budget, as
    (k, text, references, tokens), by binary search: from `guess` (else an estimate from
    the cost at lo and lo + 1), steps that double until a size that does not fit (or hi)
    is found on one side and one that fits on the other, then bisection. k fits and k + 1
    does not, or k == hi; TooShort when lo itself does not fit."""
    memo: dict[int, tuple[int, str, list[str]]] = {}

    def cost(k: int) -> int:
        if k not in memo:
            text, refs = build(k)
            memo[k] = (count(text), text, refs)
        return memo[k][0]

    if cost(lo) > budget:
        raise TooShort(cost(lo))
    if guess is None and lo < hi:  # a secant estimate: from lo and lo + 1, then once more
        unit = max(1, cost(lo + 1) - cost(lo))
        guess = min(hi, lo + (budget - cost(lo)) // unit)
        if guess > lo + 1 and cost(guess) > cost(lo):
            guess = lo + (budget - cost(lo)) * (guess - lo) // (cost(guess) - cost(lo))
    start = min(max(guess if guess is not None else lo, lo), hi)
    a, b = lo, None  # a fits; b, once known, does not
    if cost(start) <= budget:
        a, step = start, 1
        while a < hi:
            k = min(hi, a + step)
            if cost(k) > budget:
                b = k
                break
            a, step = k, step * 2
    else:
        b, step = start, 1
        while True:
            k = max(lo, b - step)
            if cost(k) <= budget:
                a = k
                break
            b, step = k, step * 2
    if b is not None:
        while b - a > 1:
            m = (a + b) // 2
            if cost(m) <= budget:
                a = m
            else:
                b = m
    return a, memo[a][1], memo[a][2], memo[a][0]
