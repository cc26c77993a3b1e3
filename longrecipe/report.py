"""The report stage: scores and training costs of one run (or a method comparison) as
Markdown with plots, stored as an artifact like every other stage.

Training FLOPs are estimated from first principles (REFERENCE.md): per token
6N for N parameters plus 6 x L x n_layers x d_model for causal attention at
sequence length L.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import duckdb

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import ReportConfig

STAGE = "report"
STAGE_VERSION = "report_v1"


def report_spec(cfg: ReportConfig, evaluations: list[ArtifactRef], trainings: Mapping[str, ArtifactRef]) -> StageSpec:
    inputs = {f"evaluate.{i}": r.key for i, r in enumerate(evaluations)}
    inputs.update({f"train.{label}": r.key for label, r in trainings.items()})
    return StageSpec(STAGE, STAGE_VERSION, cfg, inputs)


def run_report(
    cfg: ReportConfig,
    evaluations: list[ArtifactRef],
    trainings: Mapping[str, ArtifactRef],
    store: ArtifactStore,
    title: str = "longrecipe report",
) -> ArtifactRef:
    """Write `files/report.md` (or .html) with score tables, costs and plots."""

    def body(w: StageWriter) -> None:
        files = w.local_dir / "files"
        files.mkdir(parents=True, exist_ok=True)
        md = render(evaluations, trainings, files, title, store)
        if cfg.format == "html":
            (files / "report.html").write_text(_html(md, title))
        (files / "report.md").write_text(md)
        w.info.update(format=cfg.format, evaluations=len(evaluations), trainings=len(trainings))

    return store.produce(report_spec(cfg, evaluations, trainings), body)


# --------------------------------------------------------------------------- content


def render(evaluations: list[ArtifactRef], trainings: Mapping[str, ArtifactRef], out: Path, title: str,
           store: ArtifactStore | None = None) -> str:
    parts = [f"# {title}\n"]
    scores = score_rows(evaluations)
    if scores:
        parts.append("## Scores\n\nMean score (0-100) for generation suites, perplexity for "
                     "perplexity suites, by model and context length.\n")
        parts.append(_pivot_markdown(scores))
        plot = _plot_scores(scores, out / "scores.png")
        if plot:
            parts.append(f"\n![scores]({plot.name})\n")
    for ref in evaluations:
        for f in ref.manifest["files"]:
            if f["path"].endswith(".png"):
                parts.append(f"\n![{f['path']}]({ref.uri}/{f['path']})\n")
    costs = [training_cost(label, ref, store) for label, ref in trainings.items()]
    if costs:
        parts.append("\n## Training cost\n")
        # Ratios only against a training labelled "full" (the comparison flow): the
        # annealing run also trains on `full` samples, but it is no baseline.
        full = next((c for c in costs if c["label"] == "full"), None)
        parts.append("| run | method | steps | tokens | seconds | TFLOPs (est.) | FLOPs vs full | seconds vs full |")
        parts.append("|---|---|---|---|---|---|---|---|")
        for c in costs:
            rf = f"{c['flops'] / full['flops']:.2f}" if full else "-"
            rs = f"{c['seconds'] / full['seconds']:.2f}" if full and full["seconds"] else "-"
            parts.append(
                f"| {c['label']} | {c['method']} | {c['steps']} | {c['tokens']:,} | {c['seconds']:.1f} | "
                f"{c['flops'] / 1e12:.3f} | {rf} | {rs} |"
            )
    parts.append("\n## Artifacts\n")
    for ref in list(evaluations) + list(trainings.values()):
        parts.append(f"- {ref.stage} `{ref.key}`: {ref.uri}")
    return "\n".join(parts) + "\n"


def score_rows(evaluations: list[ArtifactRef]) -> list[dict]:
    """(model, suite, length, mean, n) over every evaluation artifact."""
    files = [f for ref in evaluations for f in ref.files("eval_results")]
    if not files:
        return []
    con = duckdb.connect(":memory:")
    cols = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({files!r}, union_by_name=true)").fetchall()}
    value = "coalesce(score, value)" if "value" in cols else "score"
    rows = con.execute(
        f"SELECT model, suite, length, avg({value}) AS mean, count(*) AS n "
        f"FROM read_parquet({files!r}, union_by_name=true) GROUP BY ALL ORDER BY model, suite, length"
    ).fetchall()
    return [dict(zip(("model", "suite", "length", "mean", "n"), r, strict=True)) for r in rows]


def score_table(ref: ArtifactRef) -> list[dict]:
    """Rows for a Prefect table artifact of one evaluation."""
    return [{**r, "mean": round(r["mean"], 3) if r["mean"] is not None else None} for r in score_rows([ref])]


def training_cost(label: str, ref: ArtifactRef, store: ArtifactStore | None = None) -> dict:
    """Tokens, seconds and estimated FLOPs of one training artifact. The method and the
    sequence length come from the samples artifact it was trained on."""
    import pyarrow.compute as pc

    m = ref.read_table("train_metrics")
    tokens = int(pc.max(m.column("tokens")).as_py() or 0) if m.num_rows else 0
    seconds = float(pc.max(m.column("elapsed_s")).as_py() or 0.0) if m.num_rows else 0.0
    method, seq = label, 0
    samples_key = ref.manifest.get("inputs", {}).get("samples") or ref.manifest.get("inputs", {}).get("replay")
    build = store.get("build", samples_key) if store is not None and samples_key else None
    if build is not None:
        bcfg = build.manifest["config"]
        method = bcfg.get("method", label)
        seq = bcfg["target_len"] if method == "full" else bcfg["train_len"]
    folder = ref.path / "files" / "model"
    mcfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    n_params = count_parameters(folder)
    flops = training_flops(n_params, mcfg.get("num_hidden_layers", 0), mcfg.get("hidden_size", 0), seq, tokens)
    return {"label": label, "method": method, "steps": m.num_rows, "tokens": tokens,
            "seconds": seconds, "flops": flops, "params": n_params, "seq_len": seq}


def training_flops(n_params: int, n_layers: int, d_model: int, seq_len: int, tokens: int) -> float:
    """6N + 6 * L * n_layers * d_model FLOPs per trained token (forward and backward)."""
    return float(tokens) * (6.0 * n_params + 6.0 * seq_len * n_layers * d_model)


def count_parameters(folder: Path) -> int:
    """Parameters stored in a model folder's safetensors files (tied weights once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():
                shape = fh.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def _pivot_markdown(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows if r["length"] is not None})
    keyed: dict[tuple, dict] = {}
    for r in rows:
        keyed.setdefault((r["model"], r["suite"]), {})[r["length"]] = r["mean"]
    lines = ["| model | suite | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for (model, suite), by_len in keyed.items():
        cells = [f"{by_len[n]:.2f}" if by_len.get(n) is not None else "-" for n in lengths]
        lines.append(f"| {model} | {suite} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_scores(rows: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = sorted({r["suite"] for r in rows})
    if not suites:
        return None
    fig, axes = plt.subplots(1, len(suites), figsize=(4.5 * len(suites), 3.5), squeeze=False)
    for ax, suite in zip(axes[0], suites, strict=True):
        for model in sorted({r["model"] for r in rows if r["suite"] == suite}):
            pts = sorted((r["length"], r["mean"]) for r in rows if r["suite"] == suite and r["model"] == model
                         and r["length"] is not None and r["mean"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        ax.set_title(suite)
        ax.set_xlabel("context length")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _html(md: str, title: str) -> str:
    import html

    return f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><pre>{html.escape(md)}</pre>\n"


def write_report(store: ArtifactStore, out: Path) -> Path:
    """`longrecipe report`: every evaluation and training in the store, one Markdown file."""
    evaluations = list(store.iter_refs("evaluate"))
    trainings = {f"{r.stage}-{r.key[:8]}": r for st in ("train", "anneal") for r in store.iter_refs(st)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(evaluations, trainings, out.parent, f"longrecipe report: {store.root}", store))
    return out
