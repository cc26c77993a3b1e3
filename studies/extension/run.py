"""The extension study end to end: `python studies/extension/run.py`.

1. prepare: a 2,048-id BPE tokenizer (digit pairs), a random-init Llama folder with a
   256-token window, and two corpora: pretraining (documents of exactly one window,
   with pass-key documents and drills in the evaluation's NIAH wording) and extension
   (Shakespeare and longer pass-key documents);
2. pretrain it with the library's ingest, build (full, 256) and train stages, copy the
   model to runs/base and check it retrieves pass keys at 256 (the gate);
3. the compare flow on study.yaml, once through train and once through merge;
4. summarize.py: tables, confidence intervals and plots into studies/extension/results/.

`--scale gpu` does the same with a model ten times larger (pretrain-gpu.yaml,
study-gpu.yaml, runs-gpu/, results-gpu/).

Every stage is cached in runs/store, so a rerun after a kill resumes where it stopped
and a finished study reruns in seconds. Wall time is logged per step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@dataclass(frozen=True)
class Scale:
    """One size of the study: the model, the recipes and where its files go."""

    name: str
    """cpu or gpu (named in the results' heading)."""
    shape: dict
    """LlamaConfig fields of the random-init base model."""
    pretrain: str
    """The pretraining recipe (a file beside run.py)."""
    study: str
    """The comparison recipe (a file beside run.py)."""
    runs: str
    """Working folder beside run.py (git-ignored): store, corpora, model folders."""
    results: str
    """Where summarize.py writes the tables and plots (committed)."""
    device: str
    """Where every stage runs: cpu or cuda."""
    pretrain_mix: tuple[float, float]
    """Shares of pretraining windows that hold (a full NIAH pass-key document, pass-key
    drills); the rest is Shakespeare alone."""
    extension_retrieval: dict
    """Pass-key documents of the extension corpus: count, token lengths, token share, seed."""


_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
NIAH_MIN = 128
"""Shortest pass-key document (tokens): RULER's niah prompt without haystack takes 108
tokens with the study's tokenizer, plus the answer."""
SCALES = {
    # 2-core CPU: the published study (docs/study.md), about 25 minutes.
    "cpu": Scale(
        name="cpu",
        shape=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8, max_position_embeddings=256, rope_parameters=_ROPE),
        pretrain="pretrain.yaml", study="study.yaml", runs="runs", results="results", device="cpu",
        pretrain_mix=(0.4, 0.4),
        extension_retrieval=dict(n=1000, lengths=(NIAH_MIN, 1000), share=0.4, seed=1002),
    ),
    # The base model shipped for `make demo` (models/passkey-llama-2.6m): the CPU study's
    # recipe with a model 2.3x larger (hidden 192, 5 layers, 6 heads of 32), whose fp32
    # weights still fit in the repository (10.4 MB). Only prepare and pretrain are used.
    "demo": Scale(
        name="demo",
        shape=dict(hidden_size=192, intermediate_size=512, num_hidden_layers=5, num_attention_heads=6,
                   num_key_value_heads=6, max_position_embeddings=256, rope_parameters=_ROPE),
        pretrain="pretrain.yaml", study="study.yaml", runs="runs-demo", results="results-demo",
        device="cpu", pretrain_mix=(0.4, 0.4),
        extension_retrieval=dict(n=1000, lengths=(NIAH_MIN, 1000), share=0.4, seed=1002),
    ),
    # One GPU: the same study with a model ten times larger (docs/study.md, GPU section).
    "gpu": Scale(
        name="gpu",
        shape=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                   num_key_value_heads=6, max_position_embeddings=256, rope_parameters=_ROPE),
        pretrain="pretrain-gpu.yaml", study="study-gpu.yaml", runs="runs-gpu", results="results-gpu",
        device="cuda", pretrain_mix=(0.4, 0.4),
        extension_retrieval=dict(n=2000, lengths=(NIAH_MIN, 1000), share=0.4, seed=1002),
    ),
}

# The study's fixed inputs (also stated in docs/study.md).
SEED = 2027
VOCAB = 2048
CHUNK_CHARS = 6000
WINDOW = 256  # the base model's window (pretraining documents are exactly this long)
PRETRAIN_SEED = 1001  # pass-key documents of the pretraining corpus
GATE = 0.9  # NIAH accuracy at 256 the base model must reach before extension

# Round 2 (docs/study.md): one method per compare run, through stage 0, beside the
# equal-steps comparison; shared stages (ingest, the lsd analysis, the base evaluation)
# come from the store. Name -> overrides of the study recipe.
_LOGIT_DELTA = [
    # the paper's analysis: H' is the base after a short long-context (full, 1,024) training,
    # both models read at the target length; the type statistic flags the top 20% of types
    "analyze.method=logit_delta", "analyze.max_context=1024",
    "analyze.reference_training={build: {method: full, target_len: 1024, num_samples: 160, "
    "shard_samples: 16}, train: {optim: {lr: 1.0e-3, schedule: cosine, warmup_steps: 2, "
    "max_steps: 20, batch_size: 8, precision: bf16, seed: 2027}}}",
]
ROUND2: dict[str, list[str]] = {
    # equal compute: the other method's stage-0 FLOPs
    "full@lr-flops": ["compare.methods=[full]", "compare.flops_of=longrecipe"],
    "longrecipe@full-flops": ["compare.methods=[longrecipe]", "compare.flops_of=full"],
    # the analysis rule behind LongRecipe's sentences
    "longrecipe-logit_delta": ["compare.methods=[longrecipe]", *_LOGIT_DELTA],
    "longrecipe-digits": ["compare.methods=[longrecipe]", "analyze.method=digits"],
    # LongCE-weighted loss (cap 5) from the lsd analysis's scores
    "longrecipe+longce": ["compare.methods=[longrecipe]", "train.loss_weights={cap: 5.0}"],
    "full+longce": ["compare.methods=[full]", "train.loss_weights={cap: 5.0}"],
    # keep_ratio of the non-impactful sentences (lsd)
    "longrecipe-keep0.25": ["compare.methods=[longrecipe]", "build.keep_ratio=0.25"],
    "longrecipe-keep0.5": ["compare.methods=[longrecipe]", "build.keep_ratio=0.5"],
    "longrecipe-keep1.0": ["compare.methods=[longrecipe]", "build.keep_ratio=1.0"],
}

# Set by main() from --scale, --runs, --set-pretrain and --set-study.
S: Scale = SCALES["cpu"]
PRETRAIN_SET: list[str] = []
STUDY_SET: list[str] = []
RUNS = HERE / "runs"
STORE = RUNS / "store"
INIT = RUNS / "init"
BASE = RUNS / "base"
CORPUS = RUNS / "corpus"


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--until", choices=["prepare", "pretrain", "train", "merge", "round2", "summarize"],
                   default="summarize")
    p.add_argument("--round2", default=",".join(ROUND2), metavar="NAMES",
                   help="the round-2 settings to run, comma-separated (default: all; '' none): "
                        + ", ".join(ROUND2))
    p.add_argument("--set-round2", action="append", default=[], metavar="[NAME:]KEY=VALUE",
                   help="override a field of every round-2 setting (or of setting NAME only), "
                        "after its own (repeatable)")
    p.add_argument("--no-gate", action="store_true",
                   help="go on to the extension even when the base model misses the NIAH gate")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="cpu: the published 1.1M-parameter study; gpu: a 10x model on CUDA; "
                        "demo: the 2.6M base shipped for make demo (prepare and pretrain only)")
    p.add_argument("--engine", choices=["prefect", "library"], default="prefect",
                   help="run the comparison with the compare flow (prefect) or by calling the "
                        "same library stage functions in the flow's order (library: for machines "
                        "without Prefect's server stack, e.g. an offline GPU box)")
    p.add_argument("--base", metavar="DIR",
                   help="use this pretrained model folder (e.g. models/passkey-llama-256, the demo "
                        "base made by --scale demo) instead of pretraining: prepare takes its "
                        "tokenizer, pretrain only copies it and runs the gate")
    p.add_argument("--runs", help="working folder (default: runs/ or runs-gpu/ beside run.py)")
    p.add_argument("--results", help="where summarize writes (default: results/ or results-gpu/)")
    p.add_argument("--set-pretrain", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the pretraining recipe (repeatable)")
    p.add_argument("--set-study", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the comparison recipe (repeatable)")
    args = p.parse_args(argv)
    _set_scale(SCALES[args.scale], args.runs)
    PRETRAIN_SET[:] = _paths("init", "pretrain") + args.set_pretrain
    STUDY_SET[:] = _paths("base", "extension") + args.set_study
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.chdir(ROOT)  # config paths are relative to the repository root
    sys.path[:0] = [str(ROOT), str(HERE)]
    if args.engine == "prefect":
        from longrecipe.cli import prefect_env

        prefect_env(str(STORE))
    t0 = time.perf_counter()
    steps = ["prepare", "pretrain", "train", "merge", "round2", "summarize"]
    for step in steps[: steps.index(args.until) + 1]:
        started = time.perf_counter()
        log(f"{step} ...")
        globals()[f"step_{step}"](args)
        log(f"{step} done in {time.perf_counter() - started:.0f} s")
    log(f"study done in {time.perf_counter() - t0:.0f} s")
    return 0


# --------------------------------------------------------------------------- steps


def step_prepare(args) -> None:
    """Tokenizer (runs/tokenizer), init model (runs/init) and corpora (runs/corpus); each
    written only when missing, so prepared inputs can be carried to another machine."""
    from prepare import (
        heldout_by_ingest,
        init_model,
        noise_passkey_texts,
        number_texts,
        read_jsonl,
        repo_path,
        train_tokenizer,
        write_jsonl,
    )
    from transformers import AutoTokenizer

    tok_dir = RUNS / "tokenizer"
    if args.base and not (tok_dir / "tokenizer.json").exists():  # the base's own tokenizer
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(Path(args.base) / name, tok_dir / name)
    done = [tok_dir / "tokenizer.json", CORPUS / "extension.jsonl"]
    done += [] if args.base else [CORPUS / "pretrain.jsonl"]
    chunks = [] if all(p.exists() for p in done) else _shakespeare()
    if not (tok_dir / "tokenizer.json").exists():
        tmp = RUNS / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_tokenizer(chunks + noise_passkey_texts(500, SEED) + number_texts(400, SEED), VOCAB, tmp)
        tmp.rename(tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if not args.base and not (INIT / "config.json").exists():
        tmp = RUNS / "init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tok_dir, tmp)
        init_model(tok, S.shape, tmp, SEED)
        tmp.rename(INIT)
    heldout_fraction = _study_cfg().ingest.heldout_fraction
    # Held-out Shakespeare (perplexity, retention) is never seen in pretraining either.
    train_chunks = [c for c in chunks if not heldout_by_ingest(c, heldout_fraction)]
    chunk_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in train_chunks]
    if not args.base and not (CORPUS / "pretrain.jsonl").exists():
        write_jsonl(CORPUS / "pretrain.jsonl", _pretrain_windows(tok, chunk_ids))
        log(f"{repo_path(CORPUS / 'pretrain.jsonl')}: "
            f"{len(read_jsonl(CORPUS / 'pretrain.jsonl'))} windows of {WINDOW} tokens")
    path = CORPUS / "extension.jsonl"
    if not path.exists():
        write_jsonl(path, extension_corpus(tok, tok_dir, chunks, S.extension_retrieval,
                                           heldout_fraction))
        log(f"{repo_path(path)}: {len(read_jsonl(path))} documents")


def extension_corpus(tok, tok_dir: Path, chunks: list[str], spec: dict,
                     heldout_fraction: float) -> list[str]:
    """The extension corpus: the held-out Shakespeare chunks first (the evaluation reads
    the first held-out documents long enough for each length), then the other chunks
    interleaved with pass-key documents (spec: count, token lengths, token share, seed)
    so that every prefix holds about `share` of pass-key tokens. Seeded throughout: the
    same chunks and tokenizer give the same texts (`make demo` writes its corpus with it)."""
    import random

    from prepare import heldout_by_ingest, interleave

    train_chunks = [c for c in chunks if not heldout_by_ingest(c, heldout_fraction)]
    held = [c for c in chunks if heldout_by_ingest(c, heldout_fraction)]
    n_tokens = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in train_chunks]
    rng = random.Random(spec["seed"])
    lo, hi = spec["lengths"]
    lengths = [rng.randrange(lo, hi + 1, 8) for _ in range(spec["n"])]
    docs = _retrieval_docs(lengths, spec["seed"], tok_dir)
    # Pass-key documents stay out of the held-out split: perplexity is Shakespeare's.
    docs = [d for d in docs if not heldout_by_ingest(d, heldout_fraction)]
    doc_tokens = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    order = random.Random(spec["seed"]).sample(range(len(train_chunks)), len(train_chunks))
    mixed = interleave([([train_chunks[i] for i in order], [n_tokens[i] for i in order],
                         1 - spec["share"]), (docs, doc_tokens, spec["share"])])
    return held + mixed


def _shakespeare() -> list[str]:
    from prepare import shakespeare_chunks

    text_dir = ROOT / "data/external/shakespeare"
    if not any(text_dir.glob("*.txt")):
        raise SystemExit(f"{text_dir} is empty: run `longrecipe data fetch demo` first")
    return shakespeare_chunks(text_dir, CHUNK_CHARS)


def _pretrain_windows(tok, chunk_ids: list[list[int]]) -> list[str]:
    """The pretraining corpus: one document per training sample, each exactly WINDOW tokens
    (build packs in order, so every sample starts at a document start and no pass-key
    document is cut between needle and question). By S.pretrain_mix, a window holds a
    full NIAH document (NIAH_MIN-256 tokens) or a run of short pass-key drills, followed by
    Shakespeare up to WINDOW; the other windows are Shakespeare alone. Seeded order."""
    import random

    from prepare import drill_text, exact_windows

    n = _pretrain_cfg().build.num_samples
    rng = random.Random(PRETRAIN_SEED)
    # 10% spare: exact_windows skips the few windows whose text does not tokenize back
    kinds = rng.choices(["niah", "drill", "text"], weights=[*S.pretrain_mix, 1 - sum(S.pretrain_mix)],
                        k=n + n // 10)
    niah_at = [i for i, k in enumerate(kinds) if k == "niah"]
    lengths = [rng.randrange(NIAH_MIN, WINDOW + 1, 8) for _ in niah_at]
    heads = [drill_text(rng, tok, WINDOW - 16) if k == "drill" else "" for k in kinds]
    for i, doc in zip(niah_at, _retrieval_docs(lengths, PRETRAIN_SEED, RUNS / "tokenizer"), strict=True):
        heads[i] = doc
    filler = [t for ids in chunk_ids for t in ids]  # the training Shakespeare, as one stream
    windows = exact_windows(tok, heads, filler, WINDOW)
    if len(windows) < n:
        raise SystemExit(f"prepare: only {len(windows)} of {n} pretraining windows tokenize exactly")
    return windows[:n]


_BLOCK = 1000  # pass-key documents per worker call


def _retrieval_docs(lengths: list[int], seed: int, tok_dir: Path) -> list[str]:
    """`retrieval_documents` for many lengths, in blocks of _BLOCK spread over the CPU
    cores (fitting haystacks is the slow part of preparing). Block b uses seed
    seed * 100 + b, so the documents do not depend on the number of cores."""
    from concurrent.futures import ProcessPoolExecutor

    blocks = [(lengths[i:i + _BLOCK], seed * 100 + b, str(tok_dir))
              for b, i in enumerate(range(0, len(lengths), _BLOCK))]
    with ProcessPoolExecutor(max_workers=min(len(blocks), os.cpu_count() or 1)) as pool:
        return [d for docs in pool.map(_retrieval_block, blocks) for d in docs]


def _retrieval_block(args: tuple[list[int], int, str]) -> list[str]:
    from transformers import AutoTokenizer

    from longrecipe.synthetic import retrieval_documents

    lengths, seed, tok_dir = args
    return retrieval_documents(AutoTokenizer.from_pretrained(tok_dir), lengths, seed=seed)


def step_pretrain(args) -> None:
    """ingest -> build (full, 256) -> train from random weights; then the gate."""
    import json

    from longrecipe import ArtifactStore, RuntimeConfig, run_build, run_ingest
    from longrecipe.evaluate import run_evaluate
    from longrecipe.train import run_train

    cfg = _pretrain_cfg()
    store = ArtifactStore(STORE)
    rt = RuntimeConfig(device=S.device, threads=args.threads, progress=False)
    if args.base:  # pretrained elsewhere: copied, then checked by the same gate
        folder = Path(args.base)
        log(f"base: {folder} (not pretrained here)")
    else:
        docs = run_ingest(cfg.ingest, cfg.model, store, rt)
        samples = run_build(cfg.build, docs, None, store, rt)
        model = run_train(cfg.train, samples, cfg.model, store, rt)
        log(f"pretrained: train/{model.key} loss {model.info.get('final_loss'):.3f} "
            f"in {model.info.get('steps')} steps")
        folder = model.path / "files" / "model"
    if BASE.exists() and _same_files(BASE, folder):
        pass
    else:
        shutil.rmtree(BASE, ignore_errors=True)
        shutil.copytree(folder, BASE)
    ev = run_evaluate(cfg.evaluate, {"base": str(BASE)}, store, rt)
    rows = ev.read_table("eval_summary").to_pylist()
    acc = {r["length"]: r["score"] for r in rows if r["suite"] == "niah"}
    log(f"gate: base NIAH accuracy by length {acc}")
    (RUNS / "gate.json").write_text(json.dumps({"niah": acc, "gate": GATE}) + "\n")
    if acc.get(256, 0) < 100 * GATE:
        msg = (
            f"the pretrained model retrieves {acc.get(256, 0):.0f}% of pass keys at 256 tokens, "
            f"below the gate {100 * GATE:.0f}%: pretrain longer (pretrain.yaml train.optim.max_steps)"
        )
        if not args.no_gate:
            raise SystemExit(msg)
        log("WARNING " + msg + "; going on (--no-gate): NIAH scores below say nothing about extension")


def step_train(args) -> None:
    _compare("train", args.engine)


def step_merge(args) -> None:
    _compare("merge", args.engine)


def step_round2(args) -> None:
    """Each ROUND2 setting as its own compare run through stage 0; a record of what it made
    (runs/evaluations-round2.json) for summarize.py."""
    import json

    from longrecipe import ArtifactStore

    names = [n for n in args.round2.split(",") if n]
    unknown = [n for n in names if n not in ROUND2]
    if unknown:
        raise SystemExit(f"--round2: unknown setting {unknown[0]!r}; choose from {', '.join(ROUND2)}")
    store = ArtifactStore(STORE)
    record = {}
    (RUNS / "evaluations-round2.json").unlink(missing_ok=True)
    for name in names:
        mine = [_for_setting(o, name) for o in args.set_round2 if _for_setting(o, name)]
        overrides = ["compare.through=train", *ROUND2[name], *mine]
        out = _run_compare(overrides, args.engine)
        (method,) = _study_cfg(overrides).compare.methods
        train = store.require("train", out[f"model-{method}"]["key"])
        record[name] = {"method": method, "overrides": ROUND2[name], "training": train.key,
                        "samples": train.manifest["inputs"]["samples"],
                        "evaluation": out["evaluations"][-1]["key"]}
        log(f"round 2 {name}: train/{train.key}, {train.info.get('steps')} steps")
        # after each setting, so that a run cut short can still be summarized; only this
        # run's settings, so that no other seed's record is mixed in
        (RUNS / "evaluations-round2.json").write_text(json.dumps(record, indent=1) + "\n")


def _for_setting(override: str, name: str) -> str | None:
    """`NAME:KEY=VALUE` is for setting NAME only; `KEY=VALUE` for every setting."""
    head, sep, rest = override.partition(":")
    if sep and head in ROUND2:
        return rest if head == name else None
    return override


def step_summarize(args) -> None:
    import summarize

    out = args.results or str(HERE / S.results)
    summarize.main(["--store", str(STORE), "--out", out, "--scale", S.name])


# --------------------------------------------------------------------------- helpers


def _paths(model: str, corpus: str) -> list[str]:
    """Overrides that point a recipe at this run's folders (the YAML names runs/)."""
    from prepare import repo_path

    runs = repo_path(RUNS)  # relative, as in the YAML: the same artifact keys
    return [f"model.source={runs}/{model}", f"ingest.sources=[{{path: {runs}/corpus/{corpus}.jsonl}}]"]


def _pretrain_cfg():
    from longrecipe import load_config

    return load_config(HERE / S.pretrain, PRETRAIN_SET)


def _study_cfg(extra: list[str] | None = None):
    from longrecipe import load_config

    return load_config(HERE / S.study, STUDY_SET + (extra or []))


def _set_scale(scale: Scale, runs: str | None = None) -> None:
    global S, RUNS, STORE, INIT, BASE, CORPUS
    S = scale
    RUNS = Path(runs).resolve() if runs else HERE / scale.runs
    STORE, INIT, BASE, CORPUS = RUNS / "store", RUNS / "init", RUNS / "base", RUNS / "corpus"


def _compare(through: str, engine: str) -> None:
    """The comparison through `through`, then a record of its artifact keys for summarize.py."""
    import json

    from longrecipe import ArtifactStore

    overrides = [f"compare.through={through}"]
    out = _run_compare(overrides, engine)
    cfg = _study_cfg()
    store = ArtifactStore(STORE)
    record = {"evaluations": out["evaluations"], "report": out["report"], "trainings": {},
              "anneals": {}}
    for method in cfg.compare.methods:
        ref = out[f"model-{method}"]
        if ref["stage"] == "merge":  # merge <- anneal <- train
            annealed = store.require("merge", ref["key"]).manifest["inputs"]["annealed"]
            record["anneals"][method] = annealed
            record["trainings"][method] = store.require("anneal", annealed).manifest["inputs"]["model"]
        else:
            record["trainings"][method] = ref["key"]
    (RUNS / f"evaluations-{through}.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"compare {overrides}: report {out['report']['uri']}")


def _run_compare(overrides: list[str], engine: str) -> dict:
    if engine == "prefect":
        from flows.compare import compare

        return compare(config=str(HERE / S.study), overrides=STUDY_SET + overrides, store=str(STORE),
                       device=S.device)
    return _compare_library(overrides)


def _compare_library(overrides: list[str]) -> dict:
    """flows/compare.py's compare_methods, stage for stage, as plain library calls (no
    Prefect): the same configs reach the same run_<stage> functions, so every artifact
    key is the one the flow would make. Kept in step with that flow by hand."""
    from longrecipe import ArtifactStore, RuntimeConfig, replay_build_config
    from longrecipe.analyze import run_analyze
    from longrecipe.anneal import run_anneal
    from longrecipe.budget import method_budgets, method_config
    from longrecipe.build import run_build
    from longrecipe.evaluate import run_evaluate
    from longrecipe.ingest import run_ingest
    from longrecipe.merge import run_merge
    from longrecipe.report import run_report
    from longrecipe.train import run_train

    cfg = _study_cfg(overrides)
    store = ArtifactStore(STORE)
    rt = RuntimeConfig(device=S.device, progress=False)
    docs = run_ingest(cfg.ingest, cfg.model, store, rt)
    analysis = None
    if "longrecipe" in cfg.compare.methods or cfg.train.loss_weights:
        reference = None
        if cfg.analyze.method == "logit_delta" and cfg.analyze.reference_training is not None:
            rt_cfg = cfg.analyze.reference_training
            ref_samples = run_build(rt_cfg.build, docs, None, store, rt)
            reference = run_train(rt_cfg.train, ref_samples, cfg.model, store, rt)
        analysis = run_analyze(cfg.analyze, docs, cfg.model, store, rt, reference=reference)
    evaluations = [run_evaluate(cfg.evaluate, {"base": cfg.model}, store, rt, documents=docs)]
    trainings, out, replay = {}, {}, None
    budgets = method_budgets(cfg)
    for method in cfg.compare.methods:
        mcfg = method_config(cfg, method, budgets[method])
        samples = run_build(mcfg.build, docs, analysis if method == "longrecipe" else None, store, rt)
        model = trainings[method] = run_train(mcfg.train, samples, cfg.model, store, rt,
                                              analysis if cfg.train.loss_weights else None)
        if cfg.compare.through == "merge":
            replay = replay or run_build(replay_build_config(cfg), docs, None, store, rt)
            annealed = run_anneal(cfg.anneal, model, replay, store, rt)
            model = run_merge(cfg.merge, cfg.model, annealed, store, rt)
        out[f"model-{method}"] = _ref(model)
        evaluations.append(run_evaluate(cfg.evaluate, {method: model}, store, rt, documents=docs))
        log(f"{method}: {model.stage}/{model.key}")
    report = run_report(cfg.report, evaluations, trainings, store,
                        title=f"{cfg.name}: method comparison")
    out["evaluations"] = [_ref(e) for e in evaluations]
    out["report"] = _ref(report)
    return out


def _ref(ref) -> dict:
    """An artifact as the flow's tasks return it (tasks.common.ref_dict)."""
    return {"stage": ref.stage, "key": ref.key, "uri": ref.uri}


def _same_files(a: Path, b: Path) -> bool:
    import filecmp

    names = sorted(p.name for p in b.iterdir())
    return sorted(p.name for p in a.iterdir()) == names and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


if __name__ == "__main__":
    sys.exit(main())
