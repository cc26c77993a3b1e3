"""The extension study's inputs: pass-key documents in the evaluation's NIAH wording,
the corpus mixing and held-out rule it relies on, and its two recipes."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest

from longrecipe import ArtifactStore, IngestConfig, SourceSpec, load_config, run_ingest
from longrecipe.evaluate import niah
from longrecipe.models import byte_tokenizer
from longrecipe.synthetic import ANSWER_SUFFIX, retrieval_documents, write_retrieval_corpus
from tests.conftest import QUIET

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "extension"
sys.path.insert(0, str(STUDY))

import prepare  # noqa: E402
import run as run_mod  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_retrieval_documents_are_niah_prompts_with_their_answer(tok):
    lengths = [400, 600, 600, 900]
    docs = retrieval_documents(tok, lengths, seed=7)
    assert len(docs) == len(lengths)
    head = niah.TEMPLATE.partition("{context}")[0]
    needle = re.compile(r"One of the special magic numbers for (\S+) is: (\d{7})\.")
    for doc, n in zip(docs, lengths, strict=True):
        assert doc.startswith(head)
        found = needle.findall(doc)
        assert len(found) == 1, "exactly one needle"
        key, value = found[0]
        # the question asks for the needle's key, and the document ends with its value
        assert niah.ANSWER_PREFIX.format(key=key) + f" {value}{ANSWER_SUFFIX}" in doc
        assert doc.endswith(f" {value}{ANSWER_SUFFIX}")
        # the evaluation's fitter (RULER's): within one haystack line of the requested
        # length, never over
        n_tok = len(tok(doc, add_special_tokens=False)["input_ids"])
        line = len(tok(niah.NOISE + "\n", add_special_tokens=False)["input_ids"])
        assert n - line - 8 <= n_tok <= n


def test_retrieval_documents_depths_spread_and_seeded(tok):
    docs = retrieval_documents(tok, [900] * 24, seed=3)
    assert docs == retrieval_documents(tok, [900] * 24, seed=3)
    assert docs != retrieval_documents(tok, [900] * 24, seed=4)
    values = [re.search(r"is: (\d{7})\.", d).group(1) for d in docs]
    assert len(set(values)) == len(values)
    # needle position within the haystack: early and late depths both occur
    h = len(niah.TEMPLATE.partition("{context}")[0])
    rel = [(d.index("One of the special") - h) / (d.index("\nWhat is the special") - h)
           for d in docs]
    assert min(rel) < 0.2 and max(rel) > 0.7


def test_retrieval_documents_refuse_the_evaluation_seed(tok):
    with pytest.raises(ValueError, match="seed 42"):
        retrieval_documents(tok, [500], seed=42)


def test_retrieval_documents_too_short_names_the_length(tok):
    with pytest.raises(niah.HaystackError, match="length 64 is too short"):
        retrieval_documents(tok, [64], seed=1)


def test_write_retrieval_corpus_is_ingestible(tmp_path, store, tiny_spec, tok):
    path = write_retrieval_corpus(tmp_path / "r.jsonl", tok, [450, 500], seed=5)
    ref = run_ingest(IngestConfig(sources=[SourceSpec(path=str(path))]), tiny_spec, store, QUIET)
    docs = ref.read_table("documents").to_pylist()
    assert [d["text"] for d in docs] == retrieval_documents(tok, [450, 500], seed=5)


def test_heldout_rule_matches_ingest(tmp_path, store, tiny_spec):
    """run.py keeps pass-key documents out of the held-out split by predicting ingest's
    split; if ingest's rule changes, this fails before a study silently mixes them."""
    texts = [f"Document number {i}. It has a sentence or two.\n" for i in range(60)]
    prepare.write_jsonl(tmp_path / "c.jsonl", texts)
    cfg = IngestConfig(sources=[SourceSpec(path=str(tmp_path / "c.jsonl"))], heldout_fraction=0.3)
    got = {d["text"]: d["split"] for d in run_ingest(cfg, tiny_spec, store, QUIET)
           .read_table("documents").to_pylist()}
    assert {t: ("heldout" if prepare.heldout_by_ingest(t, 0.3) else "train") for t in texts} == got
    assert 0 < sum(s == "heldout" for s in got.values()) < len(texts)


def test_interleave_keeps_the_token_share_in_every_prefix():
    rng = random.Random(0)
    a = [f"a{i}" for i in range(300)]
    b = [f"b{i}" for i in range(300)]
    na = [rng.randint(500, 2500) for _ in a]
    nb = [rng.randint(100, 1000) for _ in b]
    out = prepare.interleave([(a, na, 0.6), (b, nb, 0.4)])
    size = dict(zip(a + b, na + nb, strict=True))
    seen_a = seen_b = 0
    for i, d in enumerate(out):
        seen_a += size[d] * d.startswith("a")
        seen_b += size[d] * d.startswith("b")
        if i >= 20:
            assert abs(seen_b / (seen_a + seen_b) - 0.4) < 0.1
    assert [d for d in out if d[0] == "a"] == a[: sum(d[0] == "a" for d in out)]  # order kept


def test_shakespeare_chunks_cut_at_blank_lines(tmp_path):
    paras = [f"PARA {i}.\n" + "word " * 40 for i in range(50)]
    (tmp_path / "play.txt").write_text("\n\n".join(paras))
    chunks = prepare.shakespeare_chunks(tmp_path, 1000)
    assert len(chunks) >= 5
    assert all(c.startswith("PARA ") for c in chunks)
    assert all(len(c) >= 1000 for c in chunks[:-1])
    assert "".join(chunks).count("PARA ") <= 50


@pytest.mark.parametrize("name", ["pretrain.yaml", "study.yaml", "pretrain-gpu.yaml", "study-gpu.yaml"])
def test_study_recipes_load(name):
    cfg = load_config(STUDY / name)
    if name.startswith("pretrain"):
        assert cfg.build.method == "full" and cfg.build.target_len == 256
        assert cfg.train.max_position_embeddings == 256
    else:
        assert cfg.build.target_len == 1024 and cfg.build.train_len < 0.35 * 1024
        assert cfg.compare.methods == ["full", "randomized", "pose", "longrecipe"]
        assert cfg.analyze.method == "lsd" and cfg.analyze.max_context <= 256
        assert cfg.evaluate.lengths == [256, 512, 768, 1024]
        assert cfg.evaluate.haystack == "noise"



@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """The study's tokenizer recipe, trained on a little text and many numbers."""
    text = ["The grass is green. The sky is blue. " * 20, "One of the special magic numbers for x is: 1."]
    return prepare.train_tokenizer(text + prepare.number_texts(200, 0), 512,
                                   tmp_path_factory.mktemp("bpe"))


def test_pass_keys_are_digit_pairs_that_rarely_repeat(bpe):
    rng = random.Random(3)
    keys = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(300)]
    pieces = [bpe.convert_ids_to_tokens(bpe(" " + k, add_special_tokens=False)["input_ids"]) for k in keys]
    assert all(p[0] == "Ġ" and "".join(p[1:]) == k for p, k in zip(pieces, keys, strict=True))
    assert sum(len(p) - 1 for p in pieces) / len(pieces) < 5  # 7 digits in about 4 tokens
    repeats = sum(len(set(p[1:])) < len(p) - 1 for p in pieces)
    assert repeats / len(pieces) < 0.2  # one token per digit: about 94% of keys repeat one


def test_exact_windows_tokenize_to_the_window(bpe):
    filler = bpe("The grass is green. The sky is blue. " * 200, add_special_tokens=False)["input_ids"]
    heads = ["", "One of the special magic numbers for x is: 1234567.\n", ""] * 5
    out = prepare.exact_windows(bpe, heads, filler, 64)
    assert len(out) >= 12
    assert all(len(bpe(t, add_special_tokens=False)["input_ids"]) == 64 for t in out)
    assert sum(t.startswith("One of the special") for t in out) >= 4


def test_drill_text_fits_the_budget_and_answers_every_needle(bpe):
    text = prepare.drill_text(random.Random(0), bpe, 500)
    assert len(bpe(text, add_special_tokens=False)["input_ids"]) <= 500
    needles = re.findall(r"numbers for (\S+) is: (\d{7})\.", text)
    answers = re.findall(r"for (\S+) mentioned in the provided text is (\d{7})\.", text)
    assert len(needles) >= 2 and needles == answers


# Every size of the study shrunk to seconds: the same steps, stages and summaries.
SMOKE = [
    "--set-pretrain", "build.num_samples=64", "--set-pretrain", "train.optim.max_steps=4",
    "--set-pretrain", "train.optim.warmup_steps=1", "--set-pretrain", "evaluate.niah_samples=1",
    "--set-pretrain", "evaluate.depths=2",
    "--set-study", "build.num_samples=16", "--set-study", "train.optim.max_steps=3",
    "--set-study", "train.optim.warmup_steps=1", "--set-study", "anneal.optim.max_steps=2",
    "--set-study", "analyze.max_documents=8", "--set-study", "evaluate.niah_samples=1",
    "--set-study", "evaluate.depths=2", "--set-study", "evaluate.max_documents=2",
    # round 2 in miniature: every setting, H' of the paper's analysis in 2 steps
    "--set-round2", "longrecipe-logit_delta:analyze.reference_training.build.num_samples=4",
    "--set-round2", "longrecipe-logit_delta:analyze.reference_training.train.optim.max_steps=2",
    "--set-round2", "longrecipe-logit_delta:analyze.reference_training.train.optim.batch_size=2",
    "--set-round2", "longrecipe-logit_delta:analyze.reference_training.train.optim.warmup_steps=1",
]


@pytest.mark.integration
def test_the_study_runs_end_to_end_and_reruns_from_its_store(tmp_path):
    """`run.py` in miniature through the compare flow: prepare, pretrain, both comparisons,
    round 2, summarize; a second run finds every stage in the store and makes nothing new,
    and so does a third through the library engine."""
    import json
    import subprocess

    if not any((ROOT / "data/external/shakespeare").glob("*.txt")):
        pytest.skip("needs `longrecipe data fetch demo` (the Shakespeare texts)")
    runs, results = tmp_path / "runs", tmp_path / "results"
    cmd = [sys.executable, str(STUDY / "run.py"), "--no-gate", "--runs", str(runs),
           "--results", str(results), *SMOKE]

    def run(*extra: str) -> tuple[str, set[str]]:
        r = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout, {str(p.relative_to(runs)) for p in (runs / "store").glob("*/*")}

    out, artifacts = run()
    record = json.loads((runs / "evaluations-merge.json").read_text())
    assert set(record["trainings"]) == set(record["anneals"]) == {"full", "randomized", "pose", "longrecipe"}
    md = (results / "results.md").read_text()
    for heading in ("Pass-key (NIAH) accuracy", "Perplexity of held-out", "Paired perplexity ratios",
                    "Training cost"):
        assert heading in md
    assert "| LongRecipe + anneal + merge |" in md
    round2 = json.loads((runs / "evaluations-round2.json").read_text())
    assert set(round2) == set(run_mod.ROUND2)
    store = ArtifactStore(runs / "store")
    steps = {name: store.require("train", r["training"]).info["steps"] for name, r in round2.items()}
    assert steps["full@lr-flops"] < 3 < steps["longrecipe@full-flops"]  # equal FLOPs, both ways
    assert steps["longrecipe+longce"] == steps["longrecipe-digits"] == 3
    longce = store.require("train", round2["full+longce"]["training"])
    assert "analysis" in longce.manifest["inputs"] and longce.info["loss_weights_coverage"] > 0
    delta = store.require("build", round2["longrecipe-logit_delta"]["samples"])
    analysis = store.require("analyze", delta.manifest["inputs"]["analysis"])
    assert analysis.manifest["config"]["method"] == "logit_delta" and "reference" in analysis.manifest["inputs"]
    assert "## Round 2" in md and "| longrecipe-keep0.25 |" in md
    assert {p.name for p in results.iterdir()} >= {"results.json", "niah_accuracy.png", "perplexity.png"}

    out2, artifacts2 = run()
    assert artifacts2 == artifacts  # nothing recomputed under a new key
    assert json.loads((runs / "evaluations-merge.json").read_text()) == record

    # The library engine (for machines without Prefect's server) asks for the very same
    # artifacts, round 2 included: every key is found, none is made.
    out3, artifacts3 = run("--engine", "library", "--until", "round2")
    assert artifacts3 == artifacts
    assert json.loads((runs / "evaluations-merge.json").read_text()) == record
    assert json.loads((runs / "evaluations-round2.json").read_text()) == round2


def test_across_seeds_tabulates_each_run_with_mean_and_range(tmp_path):
    import json

    import summarize

    def run(folder: str, seed: int, lr_pose: float, lr_acc: float) -> Path:
        d = tmp_path / folder
        d.mkdir()
        (d / "results.json").write_text(json.dumps({
            "label": f"seed {seed}",
            "niah": {"longrecipe/train@pooled": {"acc": lr_acc}},
            "differences": {"longrecipe-pose/train": {"diff": lr_pose}},
            "perplexity": {"base@1024": {}},
            "perplexity_ratios": {"longrecipe/pose/train": {"ratio": 1.0 + lr_pose}},
        }))
        return d

    folders = [run("a", 1, 0.10, 0.30), run("b", 2, -0.04, 0.20)]
    text = summarize.across_seeds(folders, tmp_path / "out")
    assert (tmp_path / "out" / "seeds.md").read_text() == text
    assert "| | seed 1 | seed 2 | mean | range |" in text
    assert "| LongRecipe | 30.0 | 20.0 | 25.0 | 20.0 to 30.0 |" in text
    assert "| LongRecipe - PoSE | +10.0 | -4.0 | +3.0 | -4.0 to +10.0 |" in text
    assert "| LongRecipe / PoSE | 1.100 | 0.960 | 1.030 | 0.960 to 1.100 |" in text
    assert "| PoSE | - | - | - | - |" in text  # a variant no run measured


def test_across_seeds_tabulates_round2_with_each_seeds_interval(tmp_path):
    """Round 2 across seeds: each setting's accuracy, its paired difference with the
    seed's own 95% interval and how many seeds' intervals exclude zero, FLOPs against
    full-length training, and the share of answers kept with their needle."""
    import json

    import summarize

    def run(folder: str, seed: int, acc: float, d: tuple[float, float, float], paired: int) -> Path:
        out = tmp_path / folder
        out.mkdir()
        diff = dict(zip(("diff", "lo", "hi"), d, strict=True))
        (out / "results.json").write_text(json.dumps({
            "label": f"seed {seed}", "niah": {"full/train@pooled": {"acc": 0.7}},
            "differences": {}, "perplexity": {"base@1024": {}}, "perplexity_ratios": {},
            "costs": [{"method": "full", "through": "train", "flops": 4e12}],
            "round2": {"longrecipe@full-flops": {
                "method": "longrecipe", "steps": 600, "flops": 4e12, "seconds": 400.0, "acc": acc,
                "vs_full": diff, "vs_longrecipe": None,
                "pairs": {"samples": 100, "answers": 40, "paired": paired}}},
        }))
        return out

    folders = [run("a", 1, 0.9, (0.15, 0.10, 0.20), 10), run("b", 2, 0.8, (0.05, -0.01, 0.11), 30)]
    text = summarize.across_seeds(folders, tmp_path / "out")
    assert "| full (FLT) (equal steps) | 70.0 | 70.0 | 70.0 | 70.0 to 70.0 |" in text
    assert "| longrecipe@full-flops | 90.0 | 80.0 | 85.0 | 80.0 to 90.0 |" in text
    assert ("| longrecipe@full-flops | +15.0 [+10.0, +20.0] | +5.0 [-1.0, +11.0] | +10.0 | "
            "1 above 0, 0 below 0 of 2 |") in text
    assert "| longrecipe@full-flops | 1.00 | 1.00 | 1.00 | 1.00 to 1.00 |" in text  # FLOPs
    assert "| longrecipe@full-flops | 25 | 75 | 50 | 25 to 75 |" in text  # answers with needle
    assert (tmp_path / "out" / "round2_seeds.png").stat().st_size > 0


@pytest.mark.integration
def test_base_option_prepares_from_the_shipped_model_without_pretraining(tmp_path):
    """`run.py --base DIR` (what `make study` runs): the base's tokenizer, no pretraining
    corpus, and the extension corpus `make demo` checks (same digest)."""
    import json
    import subprocess

    if not any((ROOT / "data/external/shakespeare").glob("*.txt")):
        pytest.skip("needs `longrecipe data fetch shakespeare`")
    runs = tmp_path / "runs"
    base = ROOT / "models" / "passkey-llama-256"
    r = subprocess.run([sys.executable, str(STUDY / "run.py"), "--scale", "demo", "--base", str(base),
                        "--runs", str(runs), "--until", "prepare"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (runs / "tokenizer" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert not (runs / "corpus" / "pretrain.jsonl").exists() and not (runs / "init").exists()
    import demo_corpus

    texts = [json.loads(line)["text"] for line in open(runs / "corpus" / "extension.jsonl")]
    assert demo_corpus.texts_digest(texts) == demo_corpus.expected_digest()
