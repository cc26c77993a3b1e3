"""The report stage: scores and training costs of one run (or a method comparison) as
Markdown with plots, plus the same page as one self-contained HTML file, stored as an
artifact like every other stage.

`files/report.md` links its figures by file name (they sit beside it) and the other
artifacts by paths relative to it, so a copied or moved store still shows everything;
`files/report.html` embeds the figures (data URIs) and opens from the file system.
`embedded_markdown` is the Markdown with the figures embedded and no local links, for
places that cannot read the store (Prefect's UI).

Training FLOPs are estimated from first principles (REFERENCE.md): per token
6N for N parameters plus 6 x L x n_layers x d_model for causal attention at
sequence length L.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Mapping
from pathlib import Path

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import ReportConfig
from longrecipe.report_figures import LINKS_NOTE, heatmaps_png, lines_png, to_html
from longrecipe.report_figures import embedded_markdown as embedded_markdown  # re-exported

STAGE = "report"
STAGE_VERSION = "report_v2"  # v2: figures by relative name, report.html, heatmaps side by side

METHOD_NAMES = {"full": "full-length (FLT)", "randomized": "randomized (RPES)", "pose": "PoSE",
                "longrecipe": "LongRecipe"}
"""How the report names the compare flow's methods."""
SCORE_SUITES = ("niah", "ruler")
"""Suites scored 0-100 (the others report perplexity)."""


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
    """Write `files/report.md` with its figures and `files/report.html` (self-contained)."""

    def body(w: StageWriter) -> None:
        files = w.local_dir / "files"
        files.mkdir(parents=True, exist_ok=True)
        # the report sits at <root>/report/<key>/files/: the store root is three levels up
        md = render(evaluations, trainings, files, title, store, link_root="../../..")
        (files / "report.md").write_text(md)
        (files / "report.html").write_text(to_html(md, files, title))
        w.info.update(format=cfg.format, evaluations=len(evaluations), trainings=len(trainings),
                      figures=sorted(p.name for p in files.glob("*.png")))

    return store.produce(report_spec(cfg, evaluations, trainings), body)


def report_file(ref: ArtifactRef, fmt: str | None = None) -> Path:
    """The report file of a report artifact: report.md, or report.html (`fmt` html, or the
    recipe's report.format)."""
    fmt = fmt or ref.manifest.get("config", {}).get("format", "markdown")
    return ref.path / "files" / ("report.html" if fmt == "html" else "report.md")


# --------------------------------------------------------------------------- content


def render(evaluations: list[ArtifactRef], trainings: Mapping[str, ArtifactRef], out: Path, title: str,
           store: ArtifactStore | None = None, link_root: str | None = None) -> str:
    """The report's Markdown; its figures are written into `out` and linked by file name.
    `link_root` is the store root as seen from `out` (relative), for links to artifacts."""
    rows = summary_rows(evaluations)
    labels = _labels(evaluations, store)
    order = _order(rows, evaluations)
    costs = {label: training_cost(label, ref, store) for label, ref in trainings.items()}
    full = costs.get("full")
    parts = [f"# {title}\n"]
    glance = _at_a_glance(rows, order, labels, costs)
    if glance:
        parts += ["## At a glance\n", glance]
    niah = [r for r in rows if r["suite"] == "niah"]
    if niah:
        parts += ["\n## Pass-key retrieval (NIAH) by context length\n",
                  "Accuracy, % of needles whose value the model generated.\n",
                  _pivot(niah, order, labels, "score", "{:.0f}")]
        parts.append(_figure(out, "niah.png", "NIAH accuracy by context length",
                             lines_png(_series(niah, order, labels, "score"), "NIAH accuracy (%)",
                                       ylim=(0, 100))))
        grids = _heatmap_rows(evaluations, order, labels)
        if grids:
            parts += ["\nEach cell: mean over the needles at that depth (rows) and length "
                      "(columns); red missed, green found.\n",
                      _figure(out, "heatmaps.png", "NIAH heatmaps, one per model", heatmaps_png(grids))]
    ruler = [r for r in rows if r["suite"] == "ruler" and r["task"] == "mean"]
    if ruler:
        parts += ["\n## RULER by context length\n", "Mean score over the tasks run (0-100).\n",
                  _pivot(ruler, order, labels, "score", "{:.1f}"),
                  _figure(out, "ruler.png", "RULER mean score by context length",
                          lines_png(_series(ruler, order, labels, "score"), "RULER score", ylim=(0, 100)))]
    ppl = [r for r in rows if r["suite"] == "perplexity"]
    if ppl:
        parts += ["\n## Perplexity of held-out text by context length\n",
                  "Each window is a held-out document's first L tokens, the same documents for every "
                  "model; lower is better.\n",
                  _pivot(ppl, order, labels, "perplexity", "{:.2f}"),
                  _figure(out, "perplexity.png", "Perplexity by context length",
                          lines_png(_series(ppl, order, labels, "perplexity"), "perplexity"))]
    ret = [r for r in rows if r["suite"] == "retention"]
    if ret:
        parts += ["\n## Retention: short-context perplexity\n",
                  _pivot(ret, order, labels, "perplexity", "{:.2f}")]
    if costs:
        parts += ["\n## Training cost\n",
                  "Tokens and the training loop's own wall time, from `train_metrics`; FLOPs "
                  "estimated as 6N + 6 x L x layers x d_model per token.\n",
                  "| run | method | steps | tokens | sequence | seconds | TFLOPs (est.) | FLOPs vs full | seconds vs full |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in costs.values():
            rf = f"{c['flops'] / full['flops']:.2f}" if full and full["flops"] else "-"
            rs = f"{c['seconds'] / full['seconds']:.2f}" if full and full["seconds"] else "-"
            parts.append(f"| {c['label']} | {c['method']} | {c['steps']} | {c['tokens']:,} | {c['seq_len']:,} | "
                         f"{c['seconds']:.1f} | {c['flops'] / 1e12:.3f} | {rf} | {rs} |")
        anneals = _anneal_costs(evaluations, store)
        if anneals:
            parts.append("\nAnnealing (stage 1) of each merged model: "
                         + "; ".join(f"{METHOD_NAMES.get(k, k)} {v['steps']} steps, {v['seconds']:.1f} s, "
                                     f"{v['flops'] / 1e12:.3f} TFLOPs" for k, v in anneals.items()) + ".")
    parts.append("\n## Artifacts\n")
    parts.append("In the store" + (LINKS_NOTE if link_root else "") + ":\n")
    parts += _artifact_lines(evaluations, trainings, labels, store, link_root)
    return "\n".join(parts) + "\n"


def summary_rows(evaluations: list[ArtifactRef]) -> list[dict]:
    """`eval_summary` rows of every evaluation: model, suite, task, length, n, score, perplexity."""
    out = []
    for ref in evaluations:
        if "eval_summary" in ref.tables():
            out += ref.read_table("eval_summary").to_pylist()
    return out


def score_table(ref: ArtifactRef) -> list[dict]:
    """Rows for a Prefect table artifact of one evaluation: model, suite, length, mean, n."""
    return [{"model": r["model"], "suite": r["suite"], "task": r["task"], "length": r["length"],
             "mean": round(v, 3) if (v := _value(r)) is not None else None, "n": r["n"]}
            for r in summary_rows([ref])]


def _value(r: dict) -> float | None:
    return r["score"] if r["suite"] in SCORE_SUITES else r["perplexity"]


def _labels(evaluations: list[ArtifactRef], store: ArtifactStore | None) -> dict[str, str]:
    """Display names: the compare flow's methods by name, '+ anneal + merge' for a merged
    model (its key is a merge artifact's)."""
    out = {}
    for ref in evaluations:
        for label, key in (ref.manifest.get("info", {}).get("models") or {}).items():
            name = METHOD_NAMES.get(label, label)
            if store is not None and label in METHOD_NAMES and store.load("merge", key) is not None:
                name += " + anneal + merge"
            out[label] = name
    return out


def _order(rows: list[dict], evaluations: list[ArtifactRef]) -> list[str]:
    """Models in the order they were evaluated (the compare flow: base, then each method)."""
    models = {r["model"] for r in rows}
    seen = [m for ref in evaluations for m in (ref.manifest.get("info", {}).get("models") or {})]
    first = [m for m in dict.fromkeys(["base", *seen]) if m in models]
    return first + sorted(models - set(first))


def _pivot(rows: list[dict], order: list[str], labels: dict, field: str, fmt: str) -> str:
    lengths = sorted({r["length"] for r in rows})
    cell = {(r["model"], r["length"]): r[field] for r in rows}
    lines = ["| model | " + " | ".join(f"{n:,}" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for m in order:
        if any((m, n) in cell for n in lengths):
            vals = [fmt.format(v) if (v := cell.get((m, n))) is not None else "-" for n in lengths]
            lines.append(f"| {labels.get(m, m)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _at_a_glance(rows: list[dict], order: list[str], labels: dict, costs: dict) -> str:
    """One row per model: NIAH by length, perplexity at the longest length, stage-0 cost
    relative to full-length training (Markdown)."""
    table = glance_table(rows, order, labels, costs)
    if table is None:
        return ""
    head, body, note = table
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n\n" + note + "\n"


def glance_table(rows: list[dict], order: list[str], labels: dict,
                 costs: dict) -> tuple[list[str], list[list[str]], str] | None:
    """(header, rows, note) of the at-a-glance table, or None without NIAH or perplexity."""
    niah = {(r["model"], r["length"]): r["score"] for r in rows if r["suite"] == "niah"}
    ppl = {(r["model"], r["length"]): r["perplexity"] for r in rows if r["suite"] == "perplexity"}
    if not niah and not ppl:
        return None
    n_len = sorted({n for _, n in niah})
    p_len = max((n for _, n in ppl), default=None)
    full = costs.get("full")
    pooled = n_len[1:]  # beyond the shortest length (in a comparison: the base's window)
    head = ["model"] + [f"NIAH {n:,}" for n in n_len]
    if len(pooled) > 1:
        head.append(f"NIAH {pooled[0]:,}-{pooled[-1]:,}")
    head += [f"ppl {p_len:,}"] if p_len else []
    if full:
        head += ["FLOPs vs full", "time vs full"]
    body = []
    for m in order:
        cells = [labels.get(m, m)]
        cells += [f"{v:.0f}%" if (v := niah.get((m, n))) is not None else "-" for n in n_len]
        if len(pooled) > 1:
            vals = [niah[(m, n)] for n in pooled if niah.get((m, n)) is not None]
            cells.append(f"{sum(vals) / len(vals):.1f}%" if len(vals) == len(pooled) else "-")
        if p_len:
            cells.append(f"{v:.2f}" if (v := ppl.get((m, p_len))) is not None else "-")
        if full:
            c = costs.get(m)
            cells.append(f"{c['flops'] / full['flops']:.2f}x" if c and full["flops"] else "-")
            cells.append(f"{c['seconds'] / full['seconds']:.2f}x" if c and full["seconds"] else "-")
        body.append(cells)
    note = ("NIAH: % of pass keys retrieved at each context length (input plus answer)"
            + (f"; {pooled[0]:,}-{pooled[-1]:,}: the mean over the lengths above the shortest "
               "(the same prompts per length). " if len(pooled) > 1 else ". ")
            + (f"ppl: perplexity of held-out text at {p_len:,} tokens. " if p_len else "")
            + ("FLOPs, time: the extension training (stage 0) of each method against full-length "
               "training at the same samples and steps; annealing is the same for every method."
               if full else "")).rstrip()
    return head, body, note


def summary_text(report: ArtifactRef, store: ArtifactStore) -> str:
    """The at-a-glance table of a report artifact as plain text (the end of a terminal run)."""
    inputs = report.manifest.get("inputs", {})
    evaluations = [store.require("evaluate", inputs[k]) for k in sorted(
        (k for k in inputs if k.startswith("evaluate.")), key=lambda k: int(k.split(".")[1]))]
    trainings = {}
    for k, key in inputs.items():
        if k.startswith("train."):
            ref = store.get("train", key) or store.get("anneal", key)
            if ref is not None:
                trainings[k.split(".", 1)[1]] = ref
    rows = summary_rows(evaluations)
    costs = {label: training_cost(label, ref, store) for label, ref in trainings.items()}
    table = glance_table(rows, _order(rows, evaluations), _labels(evaluations, store), costs)
    if table is None:
        return ""
    head, body, note = table
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(head), *map(line, body), textwrap.fill(note, 100)]) + "\n"


def _series(rows: list[dict], order: list[str], labels: dict, field: str) -> dict[str, list[tuple]]:
    out = {}
    for m in order:
        pts = sorted((r["length"], r[field]) for r in rows if r["model"] == m and r[field] is not None)
        if pts:
            out[labels.get(m, m)] = pts
    return out


def _heatmap_rows(evaluations: list[ArtifactRef], order: list[str], labels: dict) -> dict[str, list]:
    """(depth, length, score) rows of the NIAH suite per model, in report order."""
    by_model: dict[str, list] = {}
    for ref in evaluations:
        if "eval_results" not in ref.tables():
            continue
        t = ref.read_table("eval_results", columns=["model", "suite", "depth", "length", "score"])
        for m, s, d, n, v in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
            if s == "niah" and v is not None:
                by_model.setdefault(m, []).append((d, n, v))
    return {labels.get(m, m): by_model[m] for m in order if m in by_model}


def _figure(out: Path, name: str, alt: str, png: bytes | None) -> str:
    if not png:
        return ""
    (out / name).write_bytes(png)
    return f"\n![{alt}]({name})\n"


def _artifact_lines(evaluations: list[ArtifactRef], trainings: Mapping[str, ArtifactRef], labels: dict,
                    store: ArtifactStore | None, link_root: str | None) -> list[str]:
    """One line per evaluation, training and evaluated model artifact: what it is, its key,
    and links (relative) to its manifest and, for a model, its folder."""
    def line(what: str, stage: str, key: str, model: bool = False) -> str:
        out = f"- {what}: {stage} `{key}`"
        if link_root:
            out += f" ([manifest]({link_root}/{stage}/{key}/manifest.json)"
            out += f", [model folder]({link_root}/{stage}/{key}/files/model/))" if model else ")"
        return out

    lines, seen = [], set()
    for ref in evaluations:
        models = ref.manifest.get("info", {}).get("models") or {}
        lines.append(line("evaluation of " + ", ".join(labels.get(m, m) for m in models), ref.stage, ref.key))
        for label, key in models.items():
            for stage in ("merge", "anneal", "train"):
                if store is not None and key not in seen and store.load(stage, key) is not None:
                    seen.add(key)
                    lines.append(line(f"model {labels.get(label, label)}", stage, key, model=True))
    for label, ref in trainings.items():
        if ref.key not in seen:
            seen.add(ref.key)
            what = {"train": "stage 0 training", "anneal": "annealing"}.get(ref.stage, ref.stage)
            lines.append(line(f"{what}, {METHOD_NAMES.get(label, label)}", ref.stage, ref.key,
                              model=True))
    return lines


# --------------------------------------------------------------------------- cost


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


def _anneal_costs(evaluations: list[ArtifactRef], store: ArtifactStore | None) -> dict[str, dict]:
    """The annealing run behind each merged model that was evaluated (merge <- anneal)."""
    out = {}
    if store is None:
        return out
    for ref in evaluations:
        for label, key in (ref.manifest.get("info", {}).get("models") or {}).items():
            merged = store.load("merge", key)
            annealed = merged and store.load("anneal", merged.manifest["inputs"].get("annealed", ""))
            if annealed:
                out[label] = training_cost(label, annealed, store)
    return out


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


# --------------------------------------------------------------------------- the CLI's report


def write_report(store: ArtifactStore, out: Path) -> Path:
    """`longrecipe report`: every evaluation and training in the store, as `out` (Markdown,
    figures beside it) and the same page as a self-contained `.html` beside it."""
    evaluations = list(store.iter_refs("evaluate"))
    trainings = {f"{r.stage}-{r.key[:8]}": r for st in ("train", "anneal") for r in store.iter_refs(st)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    link_root = os.path.relpath(store.root, out.parent.resolve()) if store.is_local else None
    md = render(evaluations, trainings, out.parent, f"longrecipe report: {Path(store.root).name}", store,
                link_root=link_root)
    out.write_text(md)
    out.with_suffix(".html").write_text(to_html(md, out.parent, "longrecipe report"))
    return out
