"""Tables, confidence intervals and plots of the extension study, from the store.

`python studies/extension/summarize.py [--store DIR]` reads the evaluations that
run.py recorded (runs/evaluations-<through>.json: the compare flow's artifact keys),
the training artifacts and their costs, and writes studies/extension/results/:
results.md (the tables docs/study.md quotes), results.json, and three PNG plots.

Uncertainty: NIAH accuracy is a proportion over prompts (depths x needles), given
with a Wilson 95% interval; differences between two methods are paired (the same
prompts), with a 95% interval from a bootstrap over prompts. Perplexity is the
geometric mean over held-out documents, with a bootstrap 95% interval over documents.
Each method was trained once (one seed): the intervals cover evaluation noise, not
the spread between training runs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from collections import defaultdict
from pathlib import Path

from prepare import repo_path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ["full", "randomized", "pose", "longrecipe"]
NAMES = {"base": "base (256)", "full": "full (FLT)", "randomized": "randomized (RPES)",
         "pose": "PoSE", "longrecipe": "LongRecipe"}
BOOT = 2000
SEED = 0


# The paired comparisons reported for NIAH accuracy and for perplexity.
PAIRS = (("longrecipe", "pose"), ("longrecipe", "randomized"), ("longrecipe", "full"),
         ("pose", "randomized"))

def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (k may be fractional: mean of scores)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def bootstrap(values: list[float], stat, rng: random.Random, n: int = BOOT) -> tuple[float, float]:
    """Percentile 95% interval of stat over resamples of values."""
    if not values:
        return (math.nan, math.nan)
    draws = sorted(stat([values[rng.randrange(len(values))] for _ in values]) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def geo_mean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


# --------------------------------------------------------------------------- loading


def load(store_dir: Path) -> dict:
    """Every result row of the study's evaluations, keyed by (variant, suite, length)."""
    from longrecipe.artifacts import ArtifactStore

    store = ArtifactStore(store_dir)
    rows: dict[tuple, list[dict]] = defaultdict(list)
    evals = {}
    seen: set[str] = set()  # the base model's evaluation is shared by both runs
    for through in ("train", "merge"):
        f = store_dir.parent / f"evaluations-{through}.json"
        if not f.exists():
            continue
        evals[through] = json.loads(f.read_text())
        for e in evals[through]["evaluations"]:
            if e["key"] in seen:
                continue
            seen.add(e["key"])
            ref = store.require("evaluate", e["key"])
            for r in ref.read_table("eval_results").to_pylist():
                label = r["model"]
                variant = label if label == "base" else f"{label}/{through}"
                rows[(variant, r["suite"], r["length"])].append(r)
    if not evals:
        raise SystemExit(f"no runs/evaluations-*.json beside {store_dir}: run run.py first")
    round2 = {}
    f = store_dir.parent / "evaluations-round2.json"
    if f.exists():  # one evaluation per setting; its rows go under the setting's name
        round2 = json.loads(f.read_text())
        for name, r2 in round2.items():
            for r in store.require("evaluate", r2["evaluation"]).read_table("eval_results").to_pylist():
                if r["model"] != "base":
                    rows[(name, r["suite"], r["length"])].append(r)
    return {"rows": rows, "evals": evals, "store": store, "round2": round2}


# Parts of the evaluation's needle and answer sentences (longrecipe.evaluate.niah), short
# enough to match in samples cut anywhere before them.
NEEDLE_RE = re.compile(r"special magic numbers for (\S+) is: (\d{7})")
ANSWER_RE = re.compile(r"for (\S+) mentioned in the provided text is (\d{7})")


def retrieval_pairs(data: dict) -> list[dict]:
    """What each method's training samples teach about retrieval: how many hold a complete
    pass-key answer, and how many of those also hold its needle (a usable example)."""
    return [dict(method=method, **samples_pairs(data["store"], key))
            for method, key in _stage0(data)["trainings"].items()]


def samples_pairs(store, train_key: str) -> dict:
    """Samples, pass-key answers and answers whose needle is in the same sample, in the
    samples a training artifact was trained on."""
    from transformers import AutoTokenizer

    train = store.require("train", train_key)
    samples = store.require("build", train.manifest["inputs"]["samples"])
    tok = AutoTokenizer.from_pretrained(str(train.path / "files" / "model"))
    n = answers = paired = 0
    for ids in samples.read_table("samples").column("input_ids").to_pylist():
        n += 1
        text = tok.decode(ids)
        needles = set(NEEDLE_RE.findall(text))
        for a in ANSWER_RE.findall(text):
            answers += 1
            paired += a in needles
    return dict(samples=n, answers=answers, paired=paired)


def _stage0(data: dict) -> dict:
    """The record of the comparison through train (or the only one there is)."""
    return data["evals"].get("train") or next(iter(data["evals"].values()))


def run_label(data: dict) -> str:
    """'seed N': the stage-0 training seed of the run (what --set-study varies)."""
    train = data["store"].require("train", next(iter(_stage0(data)["trainings"].values())))
    return f"seed {train.manifest['config']['optim']['seed']}"


def costs(data: dict) -> list[dict]:
    """Training cost per method (the report stage's estimate), plus annealing when merged."""
    from longrecipe.report import training_cost

    store = data["store"]
    out = []
    for through, ev in data["evals"].items():
        for method, key in ev["trainings"].items():
            c = training_cost(method, store.require("train", key), store)
            c["through"] = through
            anneal = ev.get("anneals", {}).get(method)
            if anneal:
                a = training_cost("anneal", store.require("anneal", anneal), store)
                c["anneal_seconds"], c["anneal_flops"] = a["seconds"], a["flops"]
            out.append(c)
    return out


# --------------------------------------------------------------------------- tables


def niah_table(rows, variants, lengths) -> tuple[str, dict]:
    lines = ["| model | " + " | ".join(f"{n}" for n in lengths) + " | 512-1024 pooled |",
             "|---|" + "---|" * (len(lengths) + 1)]
    out = {}
    for v in variants:
        cells, pooled_k, pooled_n = [], 0.0, 0
        for n in lengths:
            rs = rows.get((v, "niah", n), [])
            if not rs:
                cells.append("-")
                continue
            k = sum(r["score"] for r in rs) / 100
            lo, hi = wilson(k, len(rs))
            out[(v, n)] = dict(acc=k / len(rs), lo=lo, hi=hi, n=len(rs))
            cells.append(f"{100 * k / len(rs):.0f} [{100 * lo:.0f}, {100 * hi:.0f}]")
            if n > 256:
                pooled_k, pooled_n = pooled_k + k, pooled_n + len(rs)
        if pooled_n:
            lo, hi = wilson(pooled_k, pooled_n)
            out[(v, "pooled")] = dict(acc=pooled_k / pooled_n, lo=lo, hi=hi, n=pooled_n)
            cells.append(f"{100 * pooled_k / pooled_n:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]")
        else:
            cells.append("-")
        lines.append(f"| {label(v)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), out


def ppl_table(rows, variants, lengths, suite: str, rng) -> tuple[str, dict]:
    growth = len(lengths) > 1  # the length penalty: longest over shortest, same documents
    lines = ["| model | " + " | ".join(str(n) for n in lengths)
             + (f" | {lengths[-1]} / {lengths[0]} |" if growth else " |"),
             "|---|" + "---|" * (len(lengths) + growth)]
    out = {}
    for v in variants:
        cells = []
        for n in lengths:
            vals = [r["value"] for r in rows.get((v, suite, n), []) if r["value"] is not None]
            if not vals:
                cells.append("-")
                continue
            g = geo_mean(vals)
            lo, hi = bootstrap(vals, geo_mean, rng)
            out[(v, n)] = dict(ppl=g, lo=lo, hi=hi, n=len(vals))
            cells.append(f"{g:.2f} [{lo:.2f}, {hi:.2f}]")
        if growth and (v, lengths[0]) in out and (v, lengths[-1]) in out:
            cells.append(f"{out[(v, lengths[-1])]['ppl'] / out[(v, lengths[0])]['ppl']:.3f}")
        lines.append(f"| {label(v)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), out


def paired_difference(rows, a: str, b: str, lengths, rng) -> dict | None:
    """Accuracy of a minus b on the same prompts (pooled over lengths), bootstrap 95% CI."""
    def by_prompt(v):
        return {(n, r["depth"], r["index"]): r["score"] / 100
                for n in lengths for r in rows.get((v, "niah", n), [])}

    pa, pb = by_prompt(a), by_prompt(b)
    common = sorted(set(pa) & set(pb))
    if not common:
        return None
    diffs = [pa[k] - pb[k] for k in common]
    lo, hi = bootstrap(diffs, lambda xs: sum(xs) / len(xs), rng)
    return dict(diff=sum(diffs) / len(diffs), lo=lo, hi=hi, n=len(diffs))


def paired_ppl_ratio(rows, a: str, b: str, length: int, rng) -> dict | None:
    """Perplexity of a over b on the same held-out documents at one length (geometric
    mean of per-document ratios), bootstrap 95% CI over documents."""
    pa = {r["doc_id"]: r["value"] for r in rows.get((a, "perplexity", length), [])}
    pb = {r["doc_id"]: r["value"] for r in rows.get((b, "perplexity", length), [])}
    common = sorted(set(pa) & set(pb))
    if not common:
        return None
    logs = [math.log(pa[d] / pb[d]) for d in common]
    lo, hi = bootstrap(logs, lambda xs: sum(xs) / len(xs), rng)
    return dict(ratio=math.exp(sum(logs) / len(logs)), lo=math.exp(lo), hi=math.exp(hi),
                n=len(common))


def label(v: str) -> str:
    name, _, through = v.partition("/")
    suffix = {"train": "", "merge": " + anneal + merge"}.get(through, "")
    return NAMES.get(name, name) + suffix


def round2_section(data: dict, rows, long: list[int], rng, md: list[str]) -> dict:
    """Round 2: each setting's stage 0 beside the equal-steps runs: its cost, its NIAH
    accuracy beyond the window, paired differences on the same prompts, and how many of
    its samples' pass-key answers keep their needle."""
    from longrecipe.report import training_cost

    store = data["store"]
    ref = {m: training_cost(m, store.require("train", k), store)
           for m, k in _stage0(data)["trainings"].items()}
    full_flops = ref["full"]["flops"] if "full" in ref else None
    md += [f"## Round 2: equal compute, analysis rules, LongCE, keep_ratio (stage 0; NIAH "
           f"pooled over {', '.join(map(str, long))})", "",
           "Differences are paired on the same prompts against the equal-steps runs above, "
           "bootstrap 95% CI. FLOPs vs full: against full-length training at equal steps.", "",
           "| setting | steps | FLOPs vs full | seconds | NIAH pooled % [Wilson CI] | "
           "vs LongRecipe (points) | vs full (points) | answers with needle |",
           "|---|---|---|---|---|---|---|---|"]
    out = {}
    for name, r2 in data["round2"].items():
        c = training_cost(r2["method"], store.require("train", r2["training"]), store)
        rs = [r for n in long for r in rows.get((name, "niah", n), [])]
        k = sum(r["score"] for r in rs) / 100
        lo, hi = wilson(k, len(rs)) if rs else (0.0, 0.0)
        acc = k / len(rs) if rs else None
        d_lr = paired_difference(rows, name, "longrecipe/train", long, rng)
        d_full = paired_difference(rows, name, "full/train", long, rng)
        pairs = samples_pairs(store, r2["training"])
        out[name] = dict(method=r2["method"], steps=c["steps"], flops=c["flops"],
                         seconds=c["seconds"], acc=acc, lo=lo, hi=hi, vs_longrecipe=d_lr,
                         vs_full=d_full, pairs=pairs)

        def fmt(d):
            return "-" if d is None else f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"

        md.append(
            f"| {name} | {c['steps']} | "
            f"{c['flops'] / full_flops:.2f} | " if full_flops else f"| {name} | {c['steps']} | - | ")
        md[-1] += (f"{c['seconds']:.0f} | "
                   + (f"{100 * acc:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]" if acc is not None else "-")
                   + f" | {fmt(d_lr)} | {fmt(d_full)} | {pairs['paired']:,} of {pairs['answers']:,} |")
    md.append("")
    return out


# --------------------------------------------------------------------------- plots


def plot_lines(series: dict[str, dict], lengths, ylabel: str, path: Path, key: str,
               logy: bool = False, scale: float = 1.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v, cells in series.items():
        xs = [n for n in lengths if (v, n) in cells]
        if not xs:
            continue
        ys = [scale * cells[(v, n)][key] for n in xs]
        lo = [y - scale * cells[(v, n)]["lo"] for y, n in zip(ys, xs, strict=True)]
        hi = [scale * cells[(v, n)]["hi"] - y for y, n in zip(ys, xs, strict=True)]
        ls = "--" if v.endswith("/merge") else "-"
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ls=ls, capsize=3, label=label(v))
    ax.axvline(256, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_xticks(list(lengths))
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_costs(cost_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in cost_rows if c["through"] == "train"]
    full = next((c for c in rows if c["method"] == "full"), None)
    if not rows or full is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [NAMES.get(c["method"], c["method"]) for c in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [c["flops"] / full["flops"] for c in rows], 0.4, label="FLOPs (est.)")
    ax.bar([i + 0.2 for i in x], [c["seconds"] / full["seconds"] for c in rows], 0.4, label="seconds")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("relative to full-length training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def across_seeds(folders: list[Path], out: Path) -> str:
    """seeds.md: the headline numbers of several runs of the study (one results.json per
    folder, e.g. one per training seed), each run's value, their mean and range."""
    runs = [(r.get("label") or f.name, r) for f in folders
            for r in [json.loads((f / "results.json").read_text())]]
    names = " | ".join(n for n, _ in runs)
    head = f"| | {names} | mean | range |\n|---|" + "---|" * (len(runs) + 2)

    def row(label: str, values: list[float | None], fmt: str) -> str:
        got = [v for v in values if v is not None]
        cells = " | ".join("-" if v is None else format(v, fmt) for v in values)
        if not got:
            return f"| {label} | {cells} | - | - |"
        mean = sum(got) / len(got)
        return f"| {label} | {cells} | {mean:{fmt}} | {min(got):{fmt}} to {max(got):{fmt}} |"

    md = ["# Extension study across runs", "",
          f"Generated by `python studies/extension/summarize.py --across {' '.join(repo_path(str(f)) for f in folders)}`.",
          "", "## NIAH accuracy pooled over 512-1,024, %", "", head]
    variants = ["base"] + [f"{m}/{t}" for t in ("train", "merge") for m in METHODS]
    for v in variants:
        md.append(row(label(v), [100 * r["niah"][f"{v}@pooled"]["acc"] if f"{v}@pooled" in r["niah"]
                                 else None for _, r in runs], ".1f"))
    md += ["", "## Paired NIAH differences, 512-1,024, points", "", head]
    for t in ("train", "merge"):
        for a, b in PAIRS:
            k = f"{a}-{b}/{t}"
            md.append(row(f"{label(a + '/' + t)} - {label(b + '/' + t)}",
                          [100 * r["differences"][k]["diff"] if k in r["differences"] else None
                           for _, r in runs], "+.1f"))
    top = max(int(k.split("@")[1]) for _, r in runs for k in r["perplexity"])
    md += ["", f"## Paired perplexity ratios at {top} tokens", "", head]
    for t in ("train", "merge"):
        for a, b in PAIRS:
            k = f"{a}/{b}/{t}"
            md.append(row(f"{label(a + '/' + t)} / {label(b + '/' + t)}",
                          [r["perplexity_ratios"][k]["ratio"] if k in r["perplexity_ratios"] else None
                           for _, r in runs], ".3f"))
    out.mkdir(parents=True, exist_ok=True)
    if any(r.get("round2") for _, r in runs):
        md += round2_across(runs, head, row)
        plot_round2_seeds(runs, out / "round2_seeds.png")
    text = "\n".join(md) + "\n"
    (out / "seeds.md").write_text(text)
    return text


def round2_across(runs: list[tuple[str, dict]], head: str, row) -> list[str]:
    """seeds.md's round-2 tables: per setting and seed, NIAH beyond the window, the paired
    differences with their 95% intervals, FLOPs against full-length training, and the
    share of pass-key answers whose needle is in the same sample."""
    names = list(dict.fromkeys(n for _, r in runs for n in r.get("round2", {})))

    def full_flops(r: dict) -> float | None:
        return next((c["flops"] for c in r["costs"] if c["method"] == "full" and c["through"] == "train"),
                    None)

    def get(r: dict, name: str) -> dict | None:
        return r.get("round2", {}).get(name)

    def diff_row(name: str, against: str) -> str:
        ds = [(get(r, name) or {}).get(against) for _, r in runs]
        cells = " | ".join("-" if d is None else
                           f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]" for d in ds)
        got = [100 * d["diff"] for d in ds if d]
        if not got:
            return f"| {name} | {cells} | - | - |"
        above = sum(d["lo"] > 0 for d in ds if d)
        below = sum(d["hi"] < 0 for d in ds if d)
        return (f"| {name} | {cells} | {sum(got) / len(got):+.1f} | {above} above 0, {below} below 0 "
                f"of {len(got)} |")

    md = ["", "## Round 2: NIAH accuracy pooled over 512-1,024, %", "", head]
    for v in ("full/train", "pose/train", "longrecipe/train"):
        md.append(row(label(v) + " (equal steps)",
                      [100 * r["niah"][f"{v}@pooled"]["acc"] if f"{v}@pooled" in r["niah"] else None
                       for _, r in runs], ".1f"))
    for n in names:
        md.append(row(n, [100 * g["acc"] if (g := get(r, n)) and g["acc"] is not None else None
                          for _, r in runs], ".1f"))
    seeds_head = head.replace("| mean | range |", "| mean | seeds whose 95% CI is |")
    for against, title in (("vs_full", "full-length training"), ("vs_longrecipe", "LongRecipe")):
        md += ["", f"## Round 2: paired NIAH difference against {title} at equal steps, points "
               "[bootstrap 95% CI over prompts]", "", seeds_head]
        md += [diff_row(n, against) for n in names]
    md += ["", "## Round 2: FLOPs against full-length training at equal steps", "", head]
    for n in names:
        md.append(row(n, [g["flops"] / f if (g := get(r, n)) and (f := full_flops(r)) else None
                          for _, r in runs], ".2f"))
    md += ["", "## Round 2: training seconds (stage 0)", "", head]
    for n in names:
        md.append(row(n, [g["seconds"] if (g := get(r, n)) else None for _, r in runs], ".0f"))
    md += ["", "## Round 2: pass-key answers in the samples that keep their needle, %", "", head]
    for n in names:
        md.append(row(n, [100 * g["pairs"]["paired"] / g["pairs"]["answers"]
                          if (g := get(r, n)) and g["pairs"]["answers"] else None for _, r in runs], ".0f"))
    return md


def plot_round2_seeds(runs: list[tuple[str, dict]], path: Path) -> None:
    """Each round-2 setting's NIAH accuracy beyond the window: one dot per seed, a bar
    at the mean, beside the equal-steps full-length and LongRecipe runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[float]] = {}
    refs = {label(v) for v in ("full/train", "pose/train", "longrecipe/train")}
    for _, r in runs:
        for v in ("full/train", "pose/train", "longrecipe/train"):
            if f"{v}@pooled" in r["niah"]:
                series.setdefault(label(v), []).append(100 * r["niah"][f"{v}@pooled"]["acc"])
        for n, g in r.get("round2", {}).items():
            if g["acc"] is not None:
                series.setdefault(n, []).append(100 * g["acc"])
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (n, ys) in enumerate(series.items()):
        ax.bar(i, sum(ys) / len(ys), 0.6, color="C1" if n in refs else "C0", alpha=0.5)
        ax.plot([i] * len(ys), ys, "k.", ms=6)
    ax.set_xticks(range(len(series)), list(series), rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("NIAH accuracy 512-1,024 (%)")
    ax.set_title(f"Round 2 across {len(runs)} runs (dots: seeds, bars: mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(HERE / "runs" / "store"))
    p.add_argument("--out", default=str(RESULTS), help="folder for results.md/json and plots")
    p.add_argument("--scale", default="cpu", help="named in the heading (cpu or gpu)")
    p.add_argument("--across", nargs="+", metavar="DIR",
                   help="instead: combine the results.json of several runs (e.g. one per seed) "
                        "into OUT/seeds.md")
    args = p.parse_args(argv)
    results = Path(args.out)
    if args.across:
        print(across_seeds([Path(d) for d in args.across], results))
        return 0
    data = load(Path(args.store))
    rows, rng = data["rows"], random.Random(SEED)
    lengths = sorted({n for (_, s, n) in rows if s == "niah"})
    ppl_lengths = sorted({n for (_, s, n) in rows if s == "perplexity"})
    variants = ["base"] + [f"{m}/{t}" for t in ("train", "merge") for m in METHODS
                           if any(k[0] == f"{m}/{t}" for k in rows)]
    results.mkdir(parents=True, exist_ok=True)

    md = [f"# Extension study ({args.scale}): measured results", "",
          f"Generated by `python studies/extension/summarize.py --store {repo_path(args.store)}` "
          "from the study's store.", ""]
    t, niah = niah_table(rows, variants, lengths)
    md += ["## Pass-key (NIAH) accuracy, % [Wilson 95% CI]", "", t, ""]
    t, ppl = ppl_table(rows, variants, ppl_lengths, "perplexity", rng)
    md += ["## Perplexity of held-out Shakespeare by length [bootstrap 95% CI over documents]",
           "", t, ""]
    ret_len = sorted({n for (_, s, n) in rows if s == "retention"})
    t, ret = ppl_table(rows, variants, ret_len, "retention", rng)
    md += [f"## Retention: perplexity at {ret_len} [bootstrap 95% CI]", "", t, ""]

    long = [n for n in lengths if n > 256]
    md += ["## Paired differences in NIAH accuracy, lengths " + ", ".join(map(str, long)),
           "", "| comparison | difference (points) | 95% CI | prompts |", "|---|---|---|---|"]
    diffs = {}
    for t_ in ("train", "merge"):
        for a, b in PAIRS:
            d = paired_difference(rows, f"{a}/{t_}", f"{b}/{t_}", long, rng)
            if d:
                diffs[f"{a}-{b}/{t_}"] = d
                md.append(f"| {label(a + '/' + t_)} - {label(b + '/' + t_)} | "
                          f"{100 * d['diff']:+.1f} | [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] "
                          f"| {d['n']} |")
    md.append("")

    top = max(ppl_lengths)
    md += [f"## Paired perplexity ratios at {top} tokens (same documents)", "",
           "| comparison | ratio | 95% CI | documents |", "|---|---|---|---|"]
    ratios = {}
    for t_ in ("train", "merge"):
        for a, b in PAIRS:
            r = paired_ppl_ratio(rows, f"{a}/{t_}", f"{b}/{t_}", top, rng)
            if r:
                ratios[f"{a}/{b}/{t_}"] = r
                md.append(f"| {label(a + '/' + t_)} / {label(b + '/' + t_)} | {r['ratio']:.3f} | "
                          f"[{r['lo']:.3f}, {r['hi']:.3f}] | {r['n']} |")
    for m in METHODS:
        r = paired_ppl_ratio(rows, f"{m}/train", "base", top, rng)
        if r:
            ratios[f"{m}/base/train"] = r
            md.append(f"| {label(m + '/train')} / {label('base')} | {r['ratio']:.3f} | "
                      f"[{r['lo']:.3f}, {r['hi']:.3f}] | {r['n']} |")
    md.append("")

    pairs = retrieval_pairs(data)
    md += ["## Pass-key examples in the extension samples (stage 0)", "",
           "An answer is usable when its needle is in the same sample.", "",
           "| method | samples | answers | with their needle | usable per 100 samples |",
           "|---|---|---|---|---|"]
    for r in pairs:
        md.append(f"| {NAMES.get(r['method'], r['method'])} | {r['samples']:,} | {r['answers']:,} | "
                  f"{r['paired']:,} | {100 * r['paired'] / max(1, r['samples']):.1f} |")
    md.append("")

    cost_rows = costs(data)
    full = {c["through"]: c for c in cost_rows if c["method"] == "full"}
    md += ["## Training cost (extension stage 0; FLOPs estimated by the report stage)", "",
           "| method | steps | tokens | seconds | TFLOPs | FLOPs vs full | seconds vs full |",
           "|---|---|---|---|---|---|---|"]
    for c in cost_rows:
        if c["through"] != "train":
            continue
        f = full.get("train")
        md.append(f"| {NAMES.get(c['method'], c['method'])} | {c['steps']} | {c['tokens']:,} | "
                  f"{c['seconds']:.0f} | {c['flops'] / 1e12:.3f} | "
                  f"{c['flops'] / f['flops']:.2f} | {c['seconds'] / f['seconds']:.2f} |")
    anneal = [c for c in cost_rows if c.get("anneal_seconds") is not None]
    if anneal:
        a = anneal[0]
        md += ["", f"Annealing (stages 1-2, the same for every method): {a['anneal_seconds']:.0f} s, "
               f"{a['anneal_flops'] / 1e12:.3f} TFLOPs each."]
    md.append("")
    round2 = round2_section(data, rows, long, rng, md) if data["round2"] else {}
    (results / "results.md").write_text("\n".join(md) + "\n")

    plot_lines({v: niah for v in variants}, lengths, "NIAH accuracy (%)",
               results / "niah_accuracy.png", "acc", scale=100)
    plot_lines({v: ppl for v in variants}, ppl_lengths, "perplexity (held-out)",
               results / "perplexity.png", "ppl", logy=True)
    plot_costs(cost_rows, results / "cost.png")
    (results / "results.json").write_text(json.dumps({
        "niah": {f"{v}@{n}": c for (v, n), c in niah.items()},
        "perplexity": {f"{v}@{n}": c for (v, n), c in ppl.items()},
        "retention": {f"{v}@{n}": c for (v, n), c in ret.items()},
        "differences": diffs,
        "perplexity_ratios": ratios,
        "costs": cost_rows,
        "retrieval_pairs": pairs,
        "round2": round2,
        "label": run_label(data),
        "evaluations": data["evals"],
    }, indent=1, default=str) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
