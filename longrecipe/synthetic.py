"""Synthetic text we write ourselves: the tiny recipe's corpus and test fixtures.

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
