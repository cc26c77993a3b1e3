"""RULER's scores, with RULER's own arithmetic (bit for bit: tests/test_ruler_parity.py
runs RULER's functions from the `nvidia-long-context-eval` wheel on the same rows).

Both metrics clean the prediction the way RULER does before matching: strip, every
control character (U+0000..U+001F) becomes a newline, strip again. A reference counts
as found when it is a case-insensitive substring.

- per sample (RULER's `*_per_sample`): `all` = found / references x 100, `part` = 100
  when any reference is found, else 0;
- per task (RULER's `metric_fn`): the per-sample fractions summed, divided by the
  number of samples, times 100, rounded to 2 decimals. Note the order: (sum / n) x 100,
  not the mean of the x100 scores, which can differ in the last bit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean_prediction(prediction: str | None) -> str:
    """RULER's post-processing: strip, control characters to newlines, strip again."""
    if prediction is None:
        return ""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _found(prediction: str, references: Sequence[str]) -> list[float]:
    if not references:
        raise ValueError("a RULER metric needs at least one reference per sample")
    pred = clean_prediction(prediction)
    return [1.0 if r.lower() in pred.lower() else 0.0 for r in references]


def string_match_all(prediction: str, references: list[str]) -> float:
    """Share of the references found in the prediction, x100 (RULER's `all` metric)."""
    return sum(_found(prediction, references)) / len(references) * 100


def string_match_part(prediction: str, references: list[str]) -> float:
    """100 when any reference is found in the prediction, else 0 (RULER's `part` metric)."""
    return max(_found(prediction, references)) * 100


METRICS = {"all": string_match_all, "part": string_match_part}
"""Metric name as stored in `eval_results.metric` -> per-sample scoring function."""


def score(metric: str, prediction: str, references: list[str]) -> float:
    """Score one sample with the named metric (`all` or `part`)."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}: choose from {', '.join(METRICS)}") from None
    return fn(prediction, references)


def task_score(metric: str, predictions: Sequence[str], references: Sequence[list[str]]) -> float:
    """A task's score over its samples, as RULER's metric_fn computes it."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose from {', '.join(METRICS)}")
    if not predictions or len(predictions) != len(references):
        raise ValueError("task_score: one list of references per prediction, at least one")
    if metric == "all":
        fractions = [sum(_found(p, r)) / len(r) for p, r in zip(predictions, references, strict=True)]
    else:
        fractions = [max(_found(p, r)) for p, r in zip(predictions, references, strict=True)]
    return round(sum(fractions) / len(predictions) * 100, 2)
