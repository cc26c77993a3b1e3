"""Inputs of RULER's 13 tasks (NVIDIA/RULER), fitted to a length with a given tokenizer.

`generate_samples(task, length, tokenizer, n, seed, data_dir, prompt_format)` returns
`n` prompts with their references: for base models the task text followed by the
answer prefix; with prompt_format="chat" the task text as the user turn of the
tokenizer's chat template, then the answer prefix (as RULER does for chat models).
The rules and templates are RULER's (the `nvidia-long-context-eval` wheel,
`long_context_eval/data/synthetic/`); the code is ours. The needles, haystacks,
sentence splitter and length fitter are longrecipe.evaluate.haystack, shared with
our NIAH grid. Where we depart from RULER's scripts, docs/ruler.md says where and why:
chiefly, every sample is fitted on its own, so that input plus tokens to generate is
at most `length` and as large as the haystack allows (RULER fits the first sample and
lets `fwe` overshoot the budget).

Each sample draws its keys, values and words from `random.Random` seeded with
(seed, task, index): the same seed and tokenizer give the same inputs, and sample i
does not depend on how many samples were asked for. The haystack size is then the
largest count whose prompt fits (a binary search, `haystack.fit`).

Word lists (adjectives, nouns, verbs) come from the `wonderwords` package, as in
RULER; the essays and the SQuAD / HotpotQA paragraphs from `data_dir`
(`longrecipe data fetch ruler`).
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from longrecipe.evaluate import ruler_data
from longrecipe.evaluate.haystack import (
    DEPTHS,
    DRAW,
    NEEDLE,
    NOISE,
    HaystackError,
    PromptFormat,
    TooShort,
    distinct,
    fit,
    lines_with_needles,
    wordlist,
)
from longrecipe.evaluate.ruler_data import RulerError

__all__ = [
    "DEPTHS", "NEEDLE", "NOISE", "RULER_TASKS", "RulerError", "RulerLengthError", "RulerSample",
    "generate_samples",
]

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
    """The prompt: task text and answer prefix, in the prompt format asked for."""
    references: list[str]
    max_new_tokens: int
    """RULER's tokens to generate for the task (part of the length budget)."""
    metric: str
    """`all` (share of references found) or `part` (any reference found)."""
    n_input_tokens: int
    """Tokens of `input` as the model is fed it (longrecipe.tokens.encode)."""


class RulerLengthError(RulerError):
    """The length is too short for the task's smallest prompt plus its tokens to generate."""


def generate_samples(
    task: str, length: int, tokenizer, n: int, seed: int, data_dir: Path,
    prompt_format: str = "base",
) -> list[RulerSample]:
    """`n` samples of `task`, each with input tokens + max_new_tokens <= `length`."""
    if task not in _TASKS:
        raise RulerError(f"unknown RULER task {task!r}: choose from {', '.join(RULER_TASKS)}")
    if n < 0 or length < 1:
        raise RulerError(f"RULER task {task}: n must be >= 0 and length >= 1 (got {n}, {length})")
    try:
        fmt = PromptFormat(prompt_format, tokenizer)
    except HaystackError as e:
        raise RulerError(str(e)) from None
    spec = _TASKS[task]
    budget = length - spec.max_new_tokens
    make = spec.make(task, length, fmt, seed, Path(data_dir))
    samples, guess = [], None
    for i in range(n):
        build, lo, hi = make(i, random.Random(f"ruler/{seed}/{task}/{i}"))
        try:
            guess, text, refs, n_tokens = fit(build, fmt.count, budget, lo, hi, guess)
        except TooShort as e:
            raise RulerLengthError(
                f"RULER task {task}: length {length} is too short: its smallest prompt has "
                f"{e.tokens} tokens and {spec.max_new_tokens} tokens are to be generated"
            ) from None
        samples.append(
            RulerSample(task, i, text, list(refs), spec.max_new_tokens, spec.metric, n_tokens)
        )
    return samples


# --------------------------------------------------------------------------- templates
# RULER's task templates and answer prefixes (its constants.py), verbatim, typos included
# ("assgined"). PromptFormat.render joins them (base: template + answer prefix, as
# RULER's prepare.py does for base models).

NIAH_TEMPLATE = (
    "Some special magic {type} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type} afterwards.\n{context}\n"
    "What are all the special magic {type} for {query} mentioned in the provided text?"
)
NIAH_ANSWER = " The special magic {type} for {query} mentioned in the provided text are"


def singular(text: str) -> str:
    """RULER's one-query, one-value form of the niah template and answer prefix."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assgined the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?"
)
FWE_ANSWER = (
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nThe following are given documents.\n\n{context}\n\n"
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nQuestion: {query}"
)
QA_ANSWER = " Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"


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
    def make(task: str, length: int, fmt: PromptFormat, seed: int, data_dir: Path):
        essay = ruler_data.essay(data_dir) if args.haystack == "essay" else None

        def sample(index: int, rng: random.Random):
            n_keys = max(args.n_keys, args.n_queries)
            keys = distinct(lambda: DRAW[args.key](rng), n_keys)
            values = [distinct(lambda: DRAW[args.value](rng), args.n_values) for _ in keys]
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
            template, answer = (singular(NIAH_TEMPLATE), singular(NIAH_ANSWER)) if single else (
                NIAH_TEMPLATE, NIAH_ANSWER)
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
                    # Needles go between lines at random places (before line i, i < n).
                    at = random.Random(layout_seed).sample(range(n), len(needles))
                    if args.haystack == "noise":
                        context = lines_with_needles(n, NOISE, needles, at)
                    else:
                        lines = distractors.first(n)
                        for i, nd in sorted(zip(at, needles, strict=True), key=lambda x: -x[0]):
                            lines.insert(i, nd)
                        context = "\n".join(lines)
                task_text = template.format(type=kind, context=context, query=query)
                return fmt.render(task_text, answer.format(type=kind, query=query)), refs

            if essay is not None:
                return build, 1, len(essay.words)
            return build, len(needles), 50 * length + len(needles)

        return sample

    return make


def _distractor(rng: random.Random, args: _Niah, keys: set[str], values: set[str]) -> str:
    # A distractor never repeats a real key or value: the needle stays unique.
    k = DRAW[args.key](rng)
    while k in keys:
        k = DRAW[args.key](rng)
    v = DRAW[args.value](rng)
    while v in values:
        v = DRAW[args.value](rng)
    return NEEDLE.format(type=args.value, key=k, value=v)


class _Stream:
    """Items drawn one after another from a seeded generator: the first n never change."""

    def __init__(self, draw: Callable[[random.Random], str], seed: str):
        self.draw, self.rng, self.items = draw, random.Random(f"{seed}/stream"), []

    def first(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(self.draw(self.rng))
        return self.items[:n]


# --------------------------------------------------------------------------- variable tracking

VT_HOPS = 4
VT_ICL_LENGTH = 500
"""RULER fits its in-context example to 500 tokens (input, answer and tokens to generate)."""


def _vt(task: str, length: int, fmt: PromptFormat, seed: int, data_dir: Path):
    # One worked example (3-letter names) goes before every task text, fitted once; as in
    # RULER it sits inside the prompt (the user turn of a chat prompt), not in a turn of
    # its own.
    def example_of(parts):
        def build(n: int) -> tuple[str, list[str]]:
            text, answer, names = parts(n)
            return text + answer + " " + " ".join(names) + "\n\n", names
        return build

    icl_build = example_of(_vt_parts(random.Random(f"ruler/{seed}/{task}/example"), name_len=3))
    try:
        icl_n = fit(
            icl_build, fmt.count, VT_ICL_LENGTH - _TASKS["vt"].max_new_tokens, 1, 10_000, None
        )[0]
    except TooShort:
        icl_n = 1  # tokenizers too fine-grained for RULER's 500 tokens still get one example

    def sample(index: int, rng: random.Random):
        icl, _ = example_of(_vt_parts(rng, name_len=3))(icl_n)
        main = _vt_parts(rng, name_len=5)

        def build(n: int) -> tuple[str, list[str]]:
            text, answer, names = main(n)
            return fmt.render(" " + icl + "\n\n" + text, answer), names

        return build, 1, 50 * length

    return sample


def _vt_parts(rng: random.Random, name_len: int) -> Callable[[int], tuple[str, str, list[str]]]:
    """Noise lines -> (task text, answer prefix, the chain's variable names)."""
    names = distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=name_len)), VT_HOPS + 1)
    value = rng.randrange(10_000, 99_999)
    chain = [f"VAR {names[0]} = {value}"] + [
        f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(VT_HOPS)
    ]
    layout_seed = f"{rng.random()}/layout"

    def parts(n: int) -> tuple[str, str, list[str]]:
        lines = [NOISE + "\n"] * n
        if len(lines) <= len(chain):  # too few lines for the chain: split them into sentences
            lines = [s + "." if s.strip() else s for line in lines for s in line.split(".")]
        at = sorted(random.Random(layout_seed).sample(range(len(lines)), len(chain)))
        for j, (i, statement) in enumerate(zip(at, chain, strict=True)):
            lines.insert(i + j, statement)
        context = " ".join(lines).replace(". \n", ".\n")
        text = VT_TEMPLATE.format(context=context, query=value)
        return text, VT_ANSWER.format(query=value, num_v=VT_HOPS + 1), list(names)

    return parts


# --------------------------------------------------------------------------- common words

CWE_COMMON = 10


def _cwe(task: str, length: int, fmt: PromptFormat, seed: int, data_dir: Path):
    words = sorted(set(wordlist("nounlist") + wordlist("adjectivelist") + wordlist("verblist")))
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
        # The worked example and its answer, appended straight after "are:" (no space) as
        # RULER does: in a chat prompt, a user turn and the assistant's answer.
        example = (CWE_TEMPLATE.format(context=word_list(ex, ex_common, ex_rare, rng)),
                   CWE_ANSWER + numbered(ex[:CWE_COMMON]))
        order = rng.sample(words, len(words))
        layout_seed = f"{rng.random()}/layout"

        def build(n: int) -> tuple[str, list[str]]:
            context = word_list(order[:n], common, rare, random.Random(layout_seed))
            prompt = fmt.render(CWE_TEMPLATE.format(context=context), CWE_ANSWER, [example])
            return prompt, order[:CWE_COMMON]

        return build, CWE_COMMON, len(order)

    return sample


# --------------------------------------------------------------------------- frequent words

FWE_ALPHA = 2.0
FWE_ZETA = math.pi**2 / 6  # zeta(2): the normaliser of the Zipf counts
FWE_WORD_LEN = 6


def _fwe_counts(n: int, vocab: int) -> list[int]:
    return [int(n * (k**-FWE_ALPHA) / FWE_ZETA) for k in range(1, vocab + 1)]


def _fwe(task: str, length: int, fmt: PromptFormat, seed: int, data_dir: Path):
    vocab_size = max(5, length // 50)
    # The answer (ranks 2-4) is only defined once their counts are distinct from each
    # other and from rank 5: the smallest such total is the lower end of the search.
    lo = next(n for n in range(1, 10_000) if (c := _fwe_counts(n, 5))[1] > c[2] > c[3] > c[4])

    def sample(index: int, rng: random.Random):
        vocab = distinct(
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
            return fmt.render(FWE_TEMPLATE.format(context=" ".join(coded)), FWE_ANSWER), vocab[1:4]

        return build, lo, 4 * length + lo

    return sample


# --------------------------------------------------------------------------- qa


def _qa(dataset: str):
    def make(task: str, length: int, fmt: PromptFormat, seed: int, data_dir: Path):
        questions, docs = ruler_data.qa_data(data_dir, dataset)

        def sample(index: int, rng: random.Random):
            if index >= len(questions):
                raise RulerError(
                    f"RULER task {task}: {dataset} has {len(questions)} questions, sample {index} asked for"
                )
            q = questions[index]  # RULER takes the questions in file order
            some_related = rng.sample(q.related, len(q.related))
            taken = set(q.gold) | set(q.related)
            # Other paragraphs in a fixed random order; more than can ever fit is not needed.
            pool = rng.sample(range(len(docs)), min(len(docs), length // 4 + len(taken)))
            pool = [d for d in pool if d not in taken]

            def build(n: int) -> tuple[str, list[str]]:
                # RULER's choice: the gold paragraphs first, then a random subset of the
                # article's other paragraphs, or all of them (in file order) and random others.
                extra = n - len(q.gold)
                more = (some_related[:extra] if extra <= len(q.related)
                        else q.related + pool[: extra - len(q.related)])
                chosen = [docs[d] for d in q.gold + more]
                # RULER's placement: a generator seeded with the run's seed alone shuffles
                # them, so the gold paragraph's slot depends only on (seed, n): the same
                # slot for every sample of a length.
                random.Random(seed).shuffle(chosen)
                context = "\n\n".join(
                    QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(chosen)
                )
                prompt = fmt.render(QA_TEMPLATE.format(context=context, query=q.query), QA_ANSWER)
                return prompt, list(q.answers)

            return build, len(q.gold), len(q.gold) + len(q.related) + len(pool)

        return sample

    return make


# --------------------------------------------------------------------------- the task table


@dataclass(frozen=True)
class _Task:
    make: Callable  # (task, length, fmt, seed, data_dir) -> (index, rng) -> (build, lo, hi)
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
