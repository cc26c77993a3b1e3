"""Synthetic text we write ourselves: the tiny recipe's corpus, test fixtures, and
pass-key retrieval documents in the evaluation's NIAH wording (the extension study).

Sentences mix names, counts and filler, so that some tokens (numbers, names
repeated from far back) depend on long context and others do not.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]
VERBS = ["keeps", "finds", "sells", "counts", "paints", "moves"]
THINGS = ["apples", "boats", "coins", "lamps", "maps", "stones", "cups"]


def filler_document(rng: random.Random, index: int, sentences: int) -> str:
    """One document: a ledger whose numbers come back later (long-range dependencies)."""
    owner = rng.choice(NAMES)
    code = rng.randint(1000, 9999)
    parts = [f"Ledger {index} of {owner}, code {code}."]
    for i in range(sentences):
        s = f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)}"
        if rng.random() < 0.3:
            s += f" and {rng.randint(2, 999)} more"
        parts.append(s + rng.choice([".", ".", "!", "?", ".\n"]))
        if i % 15 == 14:
            parts.append(f"The code of {owner} is still {code}.")
    return " ".join(parts)


def write_filler_corpus(path: str | Path, n_docs: int = 12, sentences: int = 40, seed: int = 0) -> Path:
    """A JSONL corpus of `n_docs` ledgers (field `text`)."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for d in range(n_docs):
            fh.write(json.dumps({"text": filler_document(rng, d, sentences)}) + "\n")
    return path


# --------------------------------------------------------------------------- retrieval text
#
# Pass-key documents for pretraining and extension data. They use the evaluate stage's
# own NIAH wording, haystack fitting and needle placement (longrecipe.evaluate.niah), so an
# evaluation measures exactly what was learned: a document is a NIAH prompt followed by
# its answer. Keys and numbers come from the same generator, seeded with a different
# seed, so no training needle repeats an evaluation needle (evaluations use seed 42).

ANSWER_SUFFIX = ".\n"
"""What follows the pass key in a retrieval document: the answer ends its line."""


def retrieval_document(prompt: str, value: str) -> str:
    """A NIAH prompt with its answer: what a model trained on it learns to continue."""
    return f"{prompt} {value}{ANSWER_SUFFIX}"


def retrieval_documents(
    tokenizer,
    lengths: list[int],
    *,
    seed: int,
    haystack=None,
    answer_tokens: int | None = None,
) -> list[str]:
    """One pass-key document per entry of `lengths`, each about that many tokens long
    (never more; less by up to one haystack line, the unit of RULER's fitter) with the
    needle at a uniformly random depth.

    `haystack` is a `longrecipe.evaluate.niah.Haystack` (default: RULER's noise line, the
    classic pass-key filler). `answer_tokens` is how many tokens the answer takes with
    `tokenizer` (default: measured on a sample answer); the prompt is fitted to
    length - answer_tokens with the evaluation's own fitter. Deterministic in `seed`.
    """
    from longrecipe.evaluate import niah

    if seed == 42:
        raise ValueError("retrieval_documents: seed 42 is the evaluation's; pick another")
    hay = haystack or niah.noise_haystack()
    if answer_tokens is None:
        answer_tokens = len(tokenizer(f" 1234567{ANSWER_SUFFIX}", add_special_tokens=False)["input_ids"])
    rng = random.Random(seed)
    depths = [round(rng.uniform(0.0, 100.0), 3) for _ in lengths]
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    out: list[str | None] = [None] * len(lengths)
    for n, idx in sorted(by_length.items()):
        # One call per length: the fitter encodes the haystack once for all its prompts.
        # Samples are keyed by (seed, length, depth, index): distinct across calls.
        got = niah.niah_samples(n, [depths[i] for i in idx], tokenizer, hay, samples=1,
                                seed=seed, max_new_tokens=answer_tokens)
        for i, s in zip(idx, got, strict=True):
            out[i] = retrieval_document(s.prompt, s.references[0])
    return [d for d in out if d is not None]


def write_retrieval_corpus(path: str | Path, tokenizer, lengths: list[int], *, seed: int,
                           haystack=None) -> Path:
    """A JSONL corpus (field `text`) of `retrieval_documents`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = retrieval_documents(tokenizer, lengths, seed=seed, haystack=haystack)
    with open(path, "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    return path
