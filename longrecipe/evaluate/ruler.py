"""Inputs of RULER's 13 tasks (NVIDIA/RULER), fitted to a length with a given tokenizer.

`generate_samples(task, length, tokenizer, n, seed, data_dir)` returns `n` prompts for
base models (task text plus answer prefix, no chat template) with their references.
The rules and templates are RULER's (the `nvidia-long-context-eval` wheel,
`long_context_eval/data/synthetic/`); the code is ours. Where we depart from RULER's
scripts, it is to keep a promise they break (docs/ruler.md lists each departure):
every sample is fitted on its own, so that input plus tokens to generate is at most
`length` and as large as the haystack allows (RULER fits the first sample and lets
`fwe` overshoot the budget).

Each sample draws its keys, values and words from `random.Random` seeded with
(seed, task, index): the same seed and tokenizer give the same inputs, and sample i
does not depend on how many samples were asked for. The haystack size is then the
largest count whose prompt fits, found by a bracketing search over the count that
tokenizes the whole candidate each step (a few steps per sample).

Word lists (adjectives, nouns, verbs) come from the `wonderwords` package, as in
RULER; the essays and the SQuAD / HotpotQA paragraphs from `data_dir`
(`longrecipe data fetch ruler`).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from longrecipe.errors import InputError

RULER_TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)


@dataclass(frozen=True)
class RulerSample:
    """One RULER prompt and what a correct answer contains."""

    task: str
    index: int
    input: str
    """Task text followed by the answer prefix (base-model form, no chat template)."""
    references: list[str]
    max_new_tokens: int
    """RULER's tokens to generate for the task (part of the length budget)."""
    metric: str
    """`all` (share of references found) or `part` (any reference found)."""
    n_input_tokens: int
    """Tokens of `input` as the tokenizer encodes it (special tokens included)."""


class RulerError(InputError):
    """A RULER task that cannot be generated: unknown task, missing or malformed data."""


class RulerLengthError(RulerError):
    """The length is too short for the task's smallest prompt plus its tokens to generate."""


def generate_samples(
    task: str, length: int, tokenizer, n: int, seed: int, data_dir: Path
) -> list[RulerSample]:
    """`n` samples of `task`, each with input tokens + max_new_tokens <= `length`."""
    if task not in _TASKS:
        raise RulerError(f"unknown RULER task {task!r}: choose from {', '.join(RULER_TASKS)}")
    if n < 0 or length < 1:
        raise RulerError(f"RULER task {task}: n must be >= 0 and length >= 1 (got {n}, {length})")
    spec = _TASKS[task]
    budget = length - spec.max_new_tokens
    count = _counter(tokenizer)
    make = spec.make(task, length, count, seed, Path(data_dir))
    samples, guess = [], None
    for i in range(n):
        build, lo, hi = make(i, random.Random(f"ruler/{seed}/{task}/{i}"))
        try:
            guess, text, refs, n_tokens = _fit(build, count, budget, lo, hi, guess)
        except _TooShort as e:
            raise RulerLengthError(
                f"RULER task {task}: length {length} is too short: its smallest prompt has "
                f"{e.tokens} tokens and {spec.max_new_tokens} tokens are to be generated"
            ) from None
        samples.append(
            RulerSample(task, i, text, list(refs), spec.max_new_tokens, spec.metric, n_tokens)
        )
    return samples


# --------------------------------------------------------------------------- templates
# RULER's task templates with their answer prefixes appended (prepare.py does the same
# for base models). Reproduced verbatim, typos included ("assgined").

NIAH_TEMPLATE = (
    "Some special magic {type} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type} afterwards.\n{context}\n"
    "What are all the special magic {type} for {query} mentioned in the provided text?"
    " The special magic {type} for {query} mentioned in the provided text are"
)
# With one query and one value RULER turns the template singular ("Some" -> "A",
# "are all" -> "is", "are" -> "is") and drops the plural "s" of the type.
NIAH_TEMPLATE_SINGLE = (
    "A special magic {type} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type} afterwards.\n{context}\n"
    "What is the special magic {type} for {query} mentioned in the provided text?"
    " The special magic {type} for {query} mentioned in the provided text is"
)
NEEDLE = "One of the special magic {type} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assgined the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
    " Answer: The top 10 words that appear most often in the list are:"
)
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?"
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nThe following are given documents.\n\n{context}\n\n"
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nQuestion: {query}"
    " Answer:"
)
QA_DOCUMENT = "Document {i}:\n{document}"

# Needle depths (percent of the essay's sentences): 40 evenly spaced, rounded.
DEPTHS = tuple(round(100 * i / 39) for i in range(40))


# --------------------------------------------------------------------------- fitting

Build = Callable[[int], tuple[str, list[str]]]
"""Haystack count -> (input text, references); the text must grow with the count."""


class _TooShort(Exception):
    def __init__(self, tokens: int):
        self.tokens = tokens


def _counter(tokenizer) -> Callable[[str], int]:
    # Special tokens count: the model is fed what the tokenizer makes of the prompt.
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])

    return count


def _fit(
    build: Build, count: Callable[[str], int], budget: int, lo: int, hi: int, guess: int | None
) -> tuple[int, str, list[str], int]:
    """A count k in [lo, hi] with count(build(k)) <= budget, as (k, text, refs, tokens).

    k is the largest count that fits, up to one haystack unit: the search ends when k + 1
    does not fit, when k == hi, or when the room left is under the measured average
    tokens per unit (one more unit would not fit, on average). It walks out from `guess`
    (the previous sample's answer) and then interpolates, so a sample costs a few
    tokenizations of the whole prompt; the count need not be exactly monotone in k.
    """
    memo: dict[int, tuple[int, str, list[str]]] = {}

    def cost(k: int) -> int:
        if k not in memo:
            text, refs = build(k)
            memo[k] = (count(text), text, refs)
        return memo[k][0]

    if cost(lo) > budget:
        raise _TooShort(cost(lo))
    a, b = lo, None  # a fits; b, once known, does not

    def unit() -> float:  # average tokens per haystack unit, measured from lo to a
        return (cost(a) - cost(lo)) / (a - lo) if a > lo else 0.0

    def done() -> bool:
        close = a > lo and budget - cost(a) < unit()
        return a == hi or close or (b is not None and b - a <= 1)

    if guess is not None and lo < guess <= hi:
        (a, b) = (guess, b) if cost(guess) <= budget else (a, guess)
    step, last_side, streak = 1, "", 0
    while not done():
        if b is None:  # walk up by the measured rate, at least doubling steps, until too big
            ahead = math.ceil((budget - cost(a)) / unit()) if unit() > 0 else 0
            k = min(hi, a + max(step, ahead))
            step *= 2
        else:  # interpolate; the Illinois rule halves the weight of an end that stays put
            under, over = budget - cost(a), cost(b) - budget
            if last_side == "b":
                under /= 2**streak
            elif last_side == "a":
                over /= 2**streak
            k = a + int(under * (b - a) / (under + over))
        k = min(max(k, a + 1), hi if b is None else b - 1)
        side = "a" if cost(k) <= budget else "b"
        a, b = (k, b) if side == "a" else (a, k)
        streak = streak + 1 if side == last_side else 0
        last_side = side
    return a, memo[a][1], memo[a][2], memo[a][0]


# --------------------------------------------------------------------------- word lists


@functools.cache
def _wordlist(name: str) -> tuple[str, ...]:
    """A wonderwords list (`nounlist`, `adjectivelist`, `verblist`), sorted and deduplicated."""
    from importlib import resources

    try:
        text = resources.files("wonderwords").joinpath(f"assets/{name}.txt").read_text("utf-8")
    except ModuleNotFoundError:
        raise RulerError(
            "RULER's word lists come from the `wonderwords` package: pip install wonderwords"
        ) from None
    return tuple(sorted({w.strip() for w in text.splitlines() if w.strip()}))


def _adj_noun(rng: random.Random) -> str:
    # Uniform over all adjective-noun pairs, as RULER's list of every pair is.
    return f"{rng.choice(_wordlist('adjectivelist'))}-{rng.choice(_wordlist('nounlist'))}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_DRAW = {"words": _adj_noun, "numbers": _number, "uuids": _uuid}


# --------------------------------------------------------------------------- niah


@dataclass(frozen=True)
class _Niah:
    haystack: str  # "noise" | "essay" | "needle"
    key: str  # "words" | "uuids"
    value: str  # "numbers" | "uuids"
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1


def _niah(args: _Niah):
    def make(task: str, length: int, count, seed: int, data_dir: Path):
        essay = _essay(data_dir) if args.haystack == "essay" else None

        def sample(index: int, rng: random.Random):
            n_keys = max(args.n_keys, args.n_queries)
            keys = _distinct(lambda: _DRAW[args.key](rng), n_keys)
            values = [_distinct(lambda: _DRAW[args.value](rng), args.n_values) for _ in keys]
            needles = [
                NEEDLE.format(type=args.value, key=k, value=v)
                for k, vs in zip(keys, values, strict=True)
                for v in vs
            ]
            rng.shuffle(needles)
            depths = rng.sample(DEPTHS, len(needles))
            asked = rng.sample(range(n_keys), args.n_queries)
            queries = [keys[i] for i in asked]
            refs = [v for i in asked for v in values[i]]
            query = (
                queries[0]
                if len(queries) == 1
                else ", ".join(queries[:-1]) + ", and " + queries[-1]
            )
            single = args.n_queries * args.n_values == 1
            template = NIAH_TEMPLATE_SINGLE if single else NIAH_TEMPLATE
            kind = args.value[:-1] if single else args.value
            layout_seed = f"{rng.random()}/layout"
            taken_keys, taken_values = set(keys), {v for vs in values for v in vs}
            distractors = _Stream(
                lambda r: _distractor(r, args, taken_keys, taken_values), layout_seed
            )

            def build(n: int) -> tuple[str, list[str]]:
                if essay is not None:
                    context = essay.with_needles(n, needles, depths)
                else:
                    lines = [NOISE] * n if args.haystack == "noise" else distractors.first(n)
                    # Needles go between lines at random places (before line i, i < n).
                    at = sorted(
                        random.Random(layout_seed).sample(range(n), len(needles)), reverse=True
                    )
                    for i, needle in zip(at, needles, strict=True):
                        lines.insert(i, needle)
                    context = "\n".join(lines)
                return template.format(type=kind, context=context, query=query), refs

            if essay is not None:
                return build, 1, len(essay.words)
            return build, len(needles), 50 * length + len(needles)

        return sample

    return make


def _distinct(draw: Callable[[], str], k: int) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        if (x := draw()) not in out:
            out.append(x)
    return out


def _distractor(rng: random.Random, args: _Niah, keys: set[str], values: set[str]) -> str:
    # A distractor never repeats a real key or value: the needle stays unique.
    k = _DRAW[args.key](rng)
    while k in keys:
        k = _DRAW[args.key](rng)
    v = _DRAW[args.value](rng)
    while v in values:
        v = _DRAW[args.value](rng)
    return NEEDLE.format(type=args.value, key=k, value=v)


class _Stream:
    """Items drawn one after another from a seeded generator: the first n never change."""

    def __init__(self, draw: Callable[[random.Random], str], seed: str):
        self.draw, self.rng, self.items = draw, random.Random(f"{seed}/stream"), []

    def first(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(self.draw(self.rng))
        return self.items[:n]


class _Essay:
    """Paul Graham's essays as RULER uses them: whitespace-split words, then sentences."""

    def __init__(self, text: str):
        self.words = re.sub(r"\s+", " ", text).strip().split(" ")
        self.ends = _sentence_ends(self.words)

    def with_needles(self, n: int, needles: list[str], depths: list[int]) -> str:
        """The first n words with each needle after the sentence at its depth (percent)."""
        ends = self.ends[: bisect.bisect_left(self.ends, n)] + [n]
        at = sorted(int(len(ends) * (d / 100)) for d in depths)  # sentences before the needle
        parts: list[str] = []
        prev = 0
        for pos, needle in zip(at, needles, strict=True):
            cut = ends[pos - 1] if pos else 0
            parts += self.words[prev:cut]
            parts.append(needle)
            prev = cut
        parts += self.words[prev:n]
        return " ".join(parts)


_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "st",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "jr",
    "sr",
    "prof",
    "inc",
    "no",
    "cf",
}
_OPENS_SENTENCE = re.compile(r"[\"'“‘(\[]*[A-Z0-9]")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)+")


def _sentence_ends(words: list[str]) -> list[int]:
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


@functools.cache
def _essay_cached(path: Path, mtime: float) -> _Essay:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise RulerError(f"{path}: expected a JSON object with a string field 'text'")
    return _Essay(data["text"])


def _essay(data_dir: Path) -> _Essay:
    path = _data_file(data_dir, "PaulGrahamEssays.json")
    return _essay_cached(path, path.stat().st_mtime)


# --------------------------------------------------------------------------- variable tracking

VT_HOPS = 4
VT_ICL_LENGTH = 500
"""RULER fits its in-context example to 500 tokens (input, answer and tokens to generate)."""


def _vt(task: str, length: int, count, seed: int, data_dir: Path):
    # One worked example (3-letter names) goes before every prompt, fitted once.
    icl_build = _vt_build(
        random.Random(f"ruler/{seed}/{task}/example"), name_len=3, with_answer=True
    )
    try:
        icl_n = _fit(
            icl_build, count, VT_ICL_LENGTH - _TASKS["vt"].max_new_tokens, 1, 10_000, None
        )[0]
    except _TooShort:
        icl_n = 1  # tokenizers too fine-grained for RULER's 500 tokens still get one example

    def sample(index: int, rng: random.Random):
        icl, _ = _vt_build(rng, name_len=3, with_answer=True)(icl_n)
        main = _vt_build(rng, name_len=5, with_answer=False)

        def build(n: int) -> tuple[str, list[str]]:
            text, refs = main(n)
            return " " + icl + "\n\n" + text, refs

        return build, 1, 50 * length

    return sample


def _vt_build(rng: random.Random, name_len: int, with_answer: bool) -> Build:
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=name_len)), VT_HOPS + 1)
    value = rng.randrange(10_000, 99_999)
    chain = [f"VAR {names[0]} = {value}"] + [
        f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(VT_HOPS)
    ]
    layout_seed = f"{rng.random()}/layout"

    def build(n: int) -> tuple[str, list[str]]:
        lines = [NOISE + "\n"] * n
        if len(lines) <= len(chain):  # too few lines for the chain: split them into sentences
            lines = [s + "." if s.strip() else s for line in lines for s in line.split(".")]
        at = sorted(random.Random(layout_seed).sample(range(len(lines)), len(chain)))
        for j, (i, statement) in enumerate(zip(at, chain, strict=True)):
            lines.insert(i + j, statement)
        context = " ".join(lines).replace(". \n", ".\n")
        text = VT_TEMPLATE.format(context=context, query=value, num_v=VT_HOPS + 1)
        if with_answer:
            text += " " + " ".join(names) + "\n\n"
        return text, list(names)

    return build


# --------------------------------------------------------------------------- common words

CWE_COMMON = 10


def _cwe(task: str, length: int, count, seed: int, data_dir: Path):
    words = sorted(set(_wordlist("nounlist") + _wordlist("adjectivelist") + _wordlist("verblist")))
    # RULER shortens the repeats below 4k: (example words, common x, rare x), main (common x, rare x).
    example_words, ex_common, ex_rare, common, rare = (
        (20, 3, 1, 6, 1) if length < 4096 else (40, 10, 3, 30, 3)
    )

    def numbered(ws: list[str]) -> str:
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(ws))

    def word_list(chosen: list[str], n_common: int, n_rare: int, rng: random.Random) -> str:
        entries = chosen[:CWE_COMMON] * n_common + chosen[CWE_COMMON:] * n_rare
        rng.shuffle(entries)
        return numbered(entries)

    def sample(index: int, rng: random.Random):
        ex = rng.sample(words, example_words)
        ex_text = CWE_TEMPLATE.format(context=word_list(ex, ex_common, ex_rare, rng))
        # RULER appends the example's answer straight after "are:" (no space).
        ex_text += numbered(ex[:CWE_COMMON]) + "\n"
        order = rng.sample(words, len(words))
        layout_seed = f"{rng.random()}/layout"

        def build(n: int) -> tuple[str, list[str]]:
            context = word_list(order[:n], common, rare, random.Random(layout_seed))
            return ex_text + CWE_TEMPLATE.format(context=context), order[:CWE_COMMON]

        return build, CWE_COMMON, len(order)

    return sample


# --------------------------------------------------------------------------- frequent words

FWE_ALPHA = 2.0
FWE_ZETA = math.pi**2 / 6  # zeta(2): the normaliser of the Zipf counts
FWE_WORD_LEN = 6


def _fwe_counts(n: int, vocab: int) -> list[int]:
    return [int(n * (k**-FWE_ALPHA) / FWE_ZETA) for k in range(1, vocab + 1)]


def _fwe(task: str, length: int, count, seed: int, data_dir: Path):
    vocab_size = max(5, length // 50)
    # The answer (ranks 2-4) is only defined once their counts are distinct from each
    # other and from rank 5: the smallest such total is the lower end of the search.
    lo = next(n for n in range(1, 10_000) if (c := _fwe_counts(n, 5))[1] > c[2] > c[3] > c[4])

    def sample(index: int, rng: random.Random):
        vocab = _distinct(
            lambda: "".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN)), vocab_size
        )
        rng.shuffle(vocab)
        vocab[0] = "..."  # the most frequent "word" is noise (the template says to ignore it)
        layout_seed = f"{rng.random()}/layout"

        def build(n: int) -> tuple[str, list[str]]:
            coded = [
                w for w, c in zip(vocab, _fwe_counts(n, vocab_size), strict=True) for _ in range(c)
            ]
            random.Random(layout_seed).shuffle(coded)
            return FWE_TEMPLATE.format(context=" ".join(coded)), vocab[1:4]

        return build, lo, 4 * length + lo

    return sample


# --------------------------------------------------------------------------- qa


@dataclass(frozen=True)
class _Question:
    query: str
    answers: list[str]
    gold: list[int]  # paragraphs that must be in the prompt
    related: list[int]  # other paragraphs of the same article (SQuAD), preferred as filler


def _qa(dataset: str):
    def make(task: str, length: int, count, seed: int, data_dir: Path):
        questions, docs = _qa_data(data_dir, dataset)

        def sample(index: int, rng: random.Random):
            if index >= len(questions):
                raise RulerError(
                    f"RULER task {task}: {dataset} has {len(questions)} questions, sample {index} asked for"
                )
            q = questions[index]  # RULER takes the questions in file order
            related = rng.sample(q.related, len(q.related))
            taken = set(q.gold) | set(related)
            # Filler paragraphs in a fixed random order; more than can ever fit is not needed.
            pool = rng.sample(range(len(docs)), min(len(docs), length // 4 + len(taken)))
            filler = related + [d for d in pool if d not in taken]
            layout_seed = f"{rng.random()}/layout"

            def build(n: int) -> tuple[str, list[str]]:
                chosen = [docs[d] for d in q.gold + filler[: n - len(q.gold)]]
                random.Random(layout_seed).shuffle(chosen)
                context = "\n\n".join(
                    QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(chosen)
                )
                return QA_TEMPLATE.format(context=context, query=q.query), list(q.answers)

            return build, len(q.gold), len(q.gold) + len(filler)

        return sample

    return make


def _qa_data(data_dir: Path, dataset: str) -> tuple[list[_Question], list[str]]:
    path = _data_file(data_dir, f"{dataset}.json")
    return _qa_cached(path, path.stat().st_mtime, dataset)


@functools.cache
def _qa_cached(path: Path, mtime: float, dataset: str) -> tuple[list[_Question], list[str]]:
    data = _load_json(path)
    try:
        return _read_squad(data) if dataset == "squad" else _read_hotpotqa(data)
    except (KeyError, TypeError, AttributeError) as e:
        raise RulerError(
            f"{path}: not in the {dataset} format RULER uses ({type(e).__name__}: {e})"
        ) from None


def _read_squad(data) -> tuple[list[_Question], list[str]]:
    articles = data["data"]
    docs = sorted({p["context"] for a in articles for p in a["paragraphs"]})
    idx = {d: i for i, d in enumerate(docs)}
    questions = []
    for a in articles:
        in_article = [idx[p["context"]] for p in a["paragraphs"]]
        for p in a["paragraphs"]:
            gold = idx[p["context"]]
            for qa in p["qas"]:
                if qa["is_impossible"]:
                    continue
                answers = list(dict.fromkeys(x["text"] for x in qa["answers"]))
                related = [i for i in in_article if i != gold]
                questions.append(_Question(qa["question"], answers, [gold], related))
    return questions, docs


def _read_hotpotqa(data) -> tuple[list[_Question], list[str]]:
    def doc(title, sentences) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(t, s) for item in data for t, s in item["context"]})
    idx = {d: i for i, d in enumerate(docs)}
    # Every paragraph of a HotpotQA item (2 supporting, the rest distractors) is gold, as in RULER.
    questions = [
        _Question(
            item["question"], [item["answer"]], [idx[doc(t, s)] for t, s in item["context"]], []
        )
        for item in data
    ]
    return questions, docs


# --------------------------------------------------------------------------- data files


def _data_file(data_dir: Path, name: str) -> Path:
    path = Path(data_dir) / name
    if not path.is_file():
        raise RulerError(f"RULER data file {path} is missing: run `longrecipe data fetch ruler`")
    return path.resolve()


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise RulerError(f"{path}: cannot read it as JSON ({e})") from None


# --------------------------------------------------------------------------- the task table


@dataclass(frozen=True)
class _Task:
    make: Callable  # (task, length, count, seed, data_dir) -> (index, rng) -> (build, lo, hi)
    max_new_tokens: int
    metric: str


_TASKS: dict[str, _Task] = {
    "niah_single_1": _Task(_niah(_Niah("noise", "words", "numbers")), 128, "all"),
    "niah_single_2": _Task(_niah(_Niah("essay", "words", "numbers")), 128, "all"),
    "niah_single_3": _Task(_niah(_Niah("essay", "words", "uuids")), 128, "all"),
    "niah_multikey_1": _Task(_niah(_Niah("essay", "words", "numbers", n_keys=4)), 128, "all"),
    "niah_multikey_2": _Task(_niah(_Niah("needle", "words", "numbers")), 128, "all"),
    "niah_multikey_3": _Task(_niah(_Niah("needle", "uuids", "uuids")), 128, "all"),
    "niah_multivalue": _Task(_niah(_Niah("essay", "words", "numbers", n_values=4)), 128, "all"),
    "niah_multiquery": _Task(_niah(_Niah("essay", "words", "numbers", n_queries=4)), 128, "all"),
    "vt": _Task(_vt, 30, "all"),
    "cwe": _Task(_cwe, 120, "all"),
    "fwe": _Task(_fwe, 50, "all"),
    "qa_1": _Task(_qa("squad"), 32, "part"),
    "qa_2": _Task(_qa("hotpotqa"), 32, "part"),
}
assert tuple(_TASKS) == RULER_TASKS
