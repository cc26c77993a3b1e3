"""RULER's two per-sample scores, on a 0..100 scale.

Both clean the prediction the way RULER does before matching: every control
character (U+0000..U+001F) becomes a newline, then the text is stripped. A
reference counts as found when it is a case-insensitive substring.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_prediction(prediction: str) -> str:
    """RULER's post-processing: strip, control characters to newlines, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Share of the references found in the prediction, x100 (RULER's `all` metric)."""
    if not references:
        raise ValueError("string_match_all: a sample needs at least one reference")
    pred = clean_prediction(prediction).lower()
    found = sum(1 for r in references if r.lower() in pred)
    return 100.0 * found / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """100 when any reference is found in the prediction, else 0 (RULER's `part` metric)."""
    if not references:
        raise ValueError("string_match_part: a sample needs at least one reference")
    pred = clean_prediction(prediction).lower()
    return 100.0 if any(r.lower() in pred for r in references) else 0.0


METRICS = {"all": string_match_all, "part": string_match_part}
"""Metric name as stored in `eval_results.metric` -> scoring function."""


def score(metric: str, prediction: str, references: list[str]) -> float:
    """Score one sample with the named metric (`all` or `part`)."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}: choose from {', '.join(METRICS)}") from None
    return fn(prediction, references)
