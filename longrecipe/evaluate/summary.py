"""What the evaluate stage writes after its last part: `eval_summary` (one row per
model, suite, task and length), per-part seconds per sample, and the NIAH heatmaps."""

from __future__ import annotations

import math
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from longrecipe.artifacts import StageWriter
from longrecipe.evaluate.metrics import task_score
from longrecipe.evaluate.suites import EvaluateError

SUMMARY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("model_key", pa.string()),
        ("suite", pa.string()),
        ("task", pa.string()),
        ("length", pa.int32()),
        ("n", pa.int32()),
        ("score", pa.float64()),
        ("perplexity", pa.float64()),
        ("seconds_per_sample", pa.float64()),
    ]
)


def summarize(results: pa.Table) -> pa.Table:
    """One row per (model, suite, task, length): the score as RULER's metric_fn computes it
    from the predictions (metrics.task_score: rounded to 2 decimals), or perplexity (the
    exp of the mean log perplexity, i.e. of the mean token NLL over equal-length windows);
    RULER also gets a `mean` task per length, the mean of its task scores."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results.to_pylist():
        groups[(r["model"], r["model_key"], r["suite"], r["task"], r["length"])].append(r)
    rows = []
    for (model, key, suite, task, length), rs in groups.items():
        scored = [r for r in rs if r["score"] is not None]
        values = [r["value"] for r in rs if r["value"] is not None]
        metrics = {r["metric"] for r in scored}
        if len(metrics) > 1:
            raise EvaluateError(f"{model}/{suite}/{task}/{length}: rows mix metrics {metrics}")
        rows.append(dict(
            model=model, model_key=key, suite=suite, task=task, length=length, n=len(rs),
            score=task_score(metrics.pop(), [r["prediction"] for r in scored],
                             [r["references"] for r in scored]) if scored else None,
            perplexity=math.exp(sum(math.log(v) for v in values) / len(values)) if values else None,
            seconds_per_sample=sum(r["seconds"] for r in rs) / len(rs),
        ))
    ruler = defaultdict(list)
    for r in rows:
        if r["suite"] == "ruler" and r["score"] is not None:
            ruler[(r["model"], r["model_key"], r["length"])].append(r)
    for (model, key, length), rs in ruler.items():
        rows.append(dict(
            model=model, model_key=key, suite="ruler", task="mean", length=length,
            n=sum(r["n"] for r in rs), score=sum(r["score"] for r in rs) / len(rs),
            perplexity=None,
            seconds_per_sample=sum(r["seconds_per_sample"] * r["n"] for r in rs)
            / sum(r["n"] for r in rs),
        ))
    rows.sort(key=lambda r: (r["model"], r["suite"], r["task"], r["length"]))
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def seconds_per_sample(results: pa.Table) -> dict[str, float]:
    out: dict[str, list[float]] = defaultdict(list)
    for m, s, t, n, sec in zip(*(results.column(c).to_pylist()
                                 for c in ("model", "suite", "task", "length", "seconds")),
                               strict=True):
        out[f"{m}/{s}/{t}/{n}"].append(sec)
    return {k: round(sum(v) / len(v), 4) for k, v in out.items()}


def write_heatmaps(w: StageWriter, results: pa.Table, labels: list[str]) -> list[str]:
    from longrecipe.evaluate.heatmap import heatmap_png

    niah = results.filter(pc.equal(results.column("suite"), "niah"))
    written = []
    for label in labels:
        mine = niah.filter(pc.equal(niah.column("model"), label))
        if mine.num_rows == 0:
            continue
        rows = list(zip(*(mine.column(c).to_pylist() for c in ("depth", "length", "score")),
                        strict=True))
        mean = sum(r[2] for r in rows) / len(rows)
        png = heatmap_png(rows, f"NIAH: {label} (mean {mean:.1f})")
        rel = f"files/heatmap-{label}.png"
        w.fs.makedirs(f"{w.work}/files", exist_ok=True)
        with w.fs.open(f"{w.work}/{rel}", "wb") as fh:
            fh.write(png)
        written.append(rel)
    return written
