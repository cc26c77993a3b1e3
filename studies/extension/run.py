"""The extension study end to end: `python studies/extension/run.py`.

1. prepare: Shakespeare chunks, a 2,048-token BPE tokenizer, a random-init Llama folder
   with a 256-token window, and the two corpora (pretraining, extension) with pass-key
   documents in the evaluation's NIAH wording;
2. pretrain it with the library's ingest, build (full, 256) and train stages, copy the
   model to runs/base and check it retrieves pass keys at 256 (the gate);
3. the compare flow on study.yaml, once through train and once through merge;
4. summarize.py: tables, confidence intervals and plots into studies/extension/results/.

Every stage is cached in runs/store, so a rerun after a kill resumes where it stopped
and a finished study reruns in seconds. Wall time is logged per step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = HERE / "runs"
STORE = RUNS / "store"
INIT = RUNS / "init"
BASE = RUNS / "base"
CORPUS = RUNS / "corpus"

# The study's fixed inputs (also stated in docs/study.md).
SEED = 2027
VOCAB = 2048
CHUNK_CHARS = 6000
SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# Pass-key documents: how many, their token lengths, their share of the corpus tokens.
PRETRAIN_RETRIEVAL = dict(n=4000, lengths=(112, 256), share=0.4, seed=1001)
EXTENSION_RETRIEVAL = dict(n=1000, lengths=(112, 1000), share=0.4, seed=1002)
GATE = 0.9  # NIAH accuracy at 256 the base model must reach before extension


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--until", choices=["prepare", "pretrain", "train", "merge", "summarize"],
                   default="summarize")
    p.add_argument("--no-gate", action="store_true",
                   help="go on to the extension even when the base model misses the NIAH gate")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.chdir(ROOT)  # config paths are relative to the repository root
    sys.path[:0] = [str(ROOT), str(HERE)]
    from longrecipe.cli import prefect_env

    prefect_env(str(STORE))
    t0 = time.perf_counter()
    steps = ["prepare", "pretrain", "train", "merge", "summarize"]
    for step in steps[: steps.index(args.until) + 1]:
        started = time.perf_counter()
        log(f"{step} ...")
        globals()[f"step_{step}"](args)
        log(f"{step} done in {time.perf_counter() - started:.0f} s")
    log(f"study done in {time.perf_counter() - t0:.0f} s")
    return 0


# --------------------------------------------------------------------------- steps


def step_prepare(args) -> None:
    """Tokenizer, init model and corpora; each written only when missing."""
    import random

    from prepare import (
        heldout_by_ingest,
        init_model,
        interleave,
        noise_passkey_texts,
        read_jsonl,
        shakespeare_chunks,
        train_tokenizer,
        write_jsonl,
    )
    from transformers import AutoTokenizer

    from longrecipe.synthetic import retrieval_documents

    text_dir = ROOT / "data/external/shakespeare"
    if not any(text_dir.glob("*.txt")):
        raise SystemExit(f"{text_dir} is empty: run `longrecipe data fetch demo` first")
    chunks = shakespeare_chunks(text_dir, CHUNK_CHARS)
    if not (INIT / "config.json").exists():
        tmp = RUNS / "init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok = train_tokenizer(chunks + noise_passkey_texts(500, SEED), VOCAB, tmp)
        init_model(tok, SHAPE, tmp, SEED)
        tmp.rename(INIT)
    tok = AutoTokenizer.from_pretrained(str(INIT))
    heldout_fraction = _study_cfg().ingest.heldout_fraction
    # Held-out Shakespeare (perplexity, retention) is never seen in pretraining either.
    train_chunks = [c for c in chunks if not heldout_by_ingest(c, heldout_fraction)]
    n_tokens = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    sizes = dict(zip(chunks, n_tokens, strict=True))
    held = [c for c in chunks if heldout_by_ingest(c, heldout_fraction)]
    for name, spec in (("pretrain", PRETRAIN_RETRIEVAL), ("extension", EXTENSION_RETRIEVAL)):
        path = CORPUS / f"{name}.jsonl"
        if path.exists():
            continue
        rng = random.Random(spec["seed"])
        lo, hi = spec["lengths"]
        lengths = [rng.randrange(lo, hi + 1, 8) for _ in range(spec["n"])]
        docs = retrieval_documents(tok, lengths, seed=spec["seed"])
        # Pass-key documents stay out of the held-out split: perplexity is Shakespeare's.
        docs = [d for d in docs if not heldout_by_ingest(d, heldout_fraction)]
        doc_tokens = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
        order = random.Random(spec["seed"]).sample(train_chunks, len(train_chunks))
        mixed = interleave([(order, [sizes[c] for c in order], 1 - spec["share"]),
                            (docs, doc_tokens, spec["share"])])
        # The extension corpus carries the held-out chunks (perplexity, retention), first:
        # the evaluation reads the first held-out documents long enough for each length.
        write_jsonl(path, (held if name == "extension" else []) + mixed)
        log(f"{path.relative_to(ROOT)}: {len(read_jsonl(path))} documents")


def step_pretrain(args) -> None:
    """ingest -> build (full, 256) -> train from random weights; then the gate."""
    import json

    from longrecipe import ArtifactStore, RuntimeConfig, load_config, run_build, run_ingest
    from longrecipe.evaluate import run_evaluate
    from longrecipe.train import run_train

    cfg = load_config(HERE / "pretrain.yaml")
    store = ArtifactStore(STORE)
    rt = RuntimeConfig(device="cpu", threads=args.threads, progress=False)
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
    _compare(["compare.through=train"])


def step_merge(args) -> None:
    _compare(["compare.through=merge"])


def step_summarize(args) -> None:
    import summarize

    summarize.main(["--store", str(STORE)])


# --------------------------------------------------------------------------- helpers


def _study_cfg():
    from longrecipe import load_config

    return load_config(HERE / "study.yaml")


def _compare(overrides: list[str]) -> None:
    """The compare flow, then a record of its artifact keys for summarize.py."""
    import json

    from flows.compare import compare
    from longrecipe import ArtifactStore

    out = compare(config=str(HERE / "study.yaml"), overrides=overrides, store=str(STORE),
                  device="cpu")
    cfg = _study_cfg()
    through = overrides[0].split("=", 1)[1]
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


def _same_files(a: Path, b: Path) -> bool:
    import filecmp

    names = sorted(p.name for p in b.iterdir())
    return sorted(p.name for p in a.iterdir()) == names and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


if __name__ == "__main__":
    sys.exit(main())
