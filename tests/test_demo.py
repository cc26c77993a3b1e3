"""The demo: its shipped base model (files load, the card's numbers hold on a quick
re-evaluation), its recipe (a real 4x extension of that model), and the demo run in
miniature through the CLI (integration)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from longrecipe import ArtifactStore, load_config
from longrecipe.evaluate import run_evaluate
from tests.conftest import QUIET, ROOT

MODEL = ROOT / "models" / "passkey-llama-256"
DEMO = ROOT / "configs" / "demo.yaml"


def card_niah() -> dict[int, tuple[float, int]]:
    """The model card's NIAH table: length -> (accuracy %, prompts)."""
    text = (MODEL / "README.md").read_text()
    rows = re.findall(r"^\| ([\d,]+) \| ([\d.]+)% \| (\d+) \|$", text, flags=re.M)
    return {int(n.replace(",", "")): (float(acc), int(k)) for n, acc, k in rows}


def test_shipped_model_loads_and_fits_the_repository():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name: p.stat().st_size for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert sum(files.values()) <= 12 * 2**20
    model = AutoModelForCausalLM.from_pretrained(str(MODEL))
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    assert model.config.max_position_embeddings == 256 and model.config.model_type == "llama"
    n = sum(p.numel() for p in model.parameters())
    card = (MODEL / "README.md").read_text()
    assert f"{n:,} parameters" in card and "studies/extension/run.py --scale demo" in card
    # a pass key is digit pairs and a few single digits (the tokenizer the study made), not
    # one token per digit: 7 digits in at most 5 tokens on average, never 7
    import random

    rng = random.Random(0)
    counts = [len(tok(str(rng.randint(10**6, 10**7 - 1)), add_special_tokens=False)["input_ids"])
              for _ in range(200)]
    assert sum(counts) / len(counts) <= 5 and max(counts) < 7


def _binomial_tail(k: int, n: int, p: float, upper: bool) -> float:
    ks = range(k, n + 1) if upper else range(0, k + 1)
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in ks)


def test_model_card_numbers_match_a_quick_reevaluation(tmp_path):
    """A few prompts (4 depths x 3 needles, the card's seed) at 256 and 1,024: each count must be
    plausible under the card's accuracy (both binomial tails above 0.1%)."""
    card = card_niah()
    assert card[256][0] >= 90 and card[1024][0] <= 10  # what the demo relies on
    ev = load_config(DEMO).evaluate.model_copy(update={
        "suites": ["niah"], "lengths": [256, 1024], "depths": 4, "niah_samples": 3})
    ref = run_evaluate(ev, {"base": str(MODEL)}, ArtifactStore(tmp_path / "store"), QUIET)
    rows = ref.read_table("eval_results").to_pylist()
    for length in (256, 1024):
        got = [r["score"] for r in rows if r["length"] == length]
        k, n = sum(s >= 100 for s in got), len(got)
        p = min(max(card[length][0] / 100, 0.02), 0.98)
        assert _binomial_tail(k, n, p, upper=True) > 1e-3, (length, k, n, card[length])
        assert _binomial_tail(k, n, p, upper=False) > 1e-3, (length, k, n, card[length])


@pytest.fixture(scope="module")
def demo_corpus():
    """data/demo/extension.parquet as `make demo` makes it (kept when already made)."""
    sys.path.insert(0, str(ROOT / "studies" / "extension"))
    import demo_corpus as dc

    if not any(dc.SHAKESPEARE.glob("*.txt")):
        pytest.skip("needs `longrecipe data fetch shakespeare`")
    assert dc.main([]) == 0
    return dc


def test_demo_corpus_is_made_again_with_the_texts_the_figures_used(demo_corpus, tmp_path):
    """Made at run time, never shipped: the same recipe, texts and tokenizer give the texts
    whose sha256 the model folder records (the card and README figures were measured on
    them); a different result is refused, and nothing half-written is left."""
    dc = demo_corpus
    texts = dc.make_texts()
    assert dc.texts_digest(texts) == dc.expected_digest()
    assert dc.texts_digest(dc.read_texts(dc.OUT)) == dc.expected_digest()
    assert json.loads(dc.RECORD.read_text())["documents"] == len(texts)
    out = tmp_path / "x.parquet"
    dc.write(texts[:3], out)
    assert dc.main(["--out", str(out)]) == 0 and len(dc.read_texts(out)) == len(texts)
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]


def test_demo_recipe_extends_the_shipped_model_4x_with_every_method(demo_corpus):
    cfg = load_config(DEMO)
    window = json.loads((Path(cfg.model.source) if Path(cfg.model.source).is_absolute()
                         else ROOT / cfg.model.source).joinpath("config.json").read_text())
    assert cfg.model.source == "models/passkey-llama-256"
    assert window["max_position_embeddings"] == 256 and cfg.build.target_len == 4 * 256
    assert {"full", "longrecipe"} <= set(cfg.compare.methods) and cfg.compare.through == "merge"
    assert min(cfg.evaluate.lengths) == 256 and max(cfg.evaluate.lengths) == 1024
    assert {"niah", "perplexity"} <= set(cfg.evaluate.suites)
    assert all((ROOT / s.path).exists() for s in cfg.ingest.sources)
    assert cfg.analyze.max_context == 256  # the base's own window


MINI = ["analyze.max_documents=24", "build.num_samples=8", "train.optim.max_steps=2",
        "train.optim.warmup_steps=1", "train.optim.checkpoint_every=0", "anneal.optim.max_steps=2",
        "evaluate.lengths=[256, 1024]", "evaluate.depths=2", "evaluate.niah_samples=1",
        "evaluate.max_documents=2"]


@pytest.mark.integration
def test_demo_in_miniature_through_the_cli(tmp_path, demo_corpus):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), OMP_NUM_THREADS="1")
    sets = [a for o in MINI for a in ("--set", o)]
    r = subprocess.run([sys.executable, "-m", "longrecipe", "compare", str(DEMO), "--store",
                        str(tmp_path / "store"), "--device", "cpu", *sets],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    store = ArtifactStore(tmp_path / "store")
    report = next(store.iter_refs("report"))
    md = (report.path / "files" / "report.md").read_text()
    for name in ("base", "full-length (FLT) + anneal + merge", "PoSE + anneal + merge",
                 "LongRecipe + anneal + merge"):
        assert f"| {name} |" in md and name in r.stdout
    assert "NIAH 256" in r.stdout and f"report: {report.path / 'files' / 'report.md'}" in r.stdout
    assert {p.name for p in (report.path / "files").glob("*.png")} == {"niah.png", "heatmaps.png",
                                                                      "perplexity.png"}
    # without a terminal, each stage says where it is in plain lines
    assert "train: done: 2/2 steps" in r.stderr and "evaluate: done:" in r.stderr
