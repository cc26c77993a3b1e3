"""The paper's selection: impactful token types over the corpus, sentence flags by share,
token categories, the reference H' trained inside the DAG, resume across the steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from longrecipe import (
    AnalyzeConfig,
    ArtifactStore,
    BuildConfig,
    OptimConfig,
    RopeConfig,
    TrainConfig,
    run_analyze,
)
from longrecipe import analyze as analyze_mod
from longrecipe.analyze import AnalyzeError, run_reference_training
from longrecipe.config import ReferenceTrainingConfig
from longrecipe.selection import flag_sentences, sentence_counts
from longrecipe.token_categories import token_category
from tests.conftest import QUIET

# The paper's method with the base model's RoPE changed as H' (the `Done when` command).
LOGIT_DELTA = dict(method="logit_delta", reference_rope=RopeConfig(theta=160000.0),
                   max_context=1024, shard_docs=4)


def test_logit_delta_flags_a_set_share_of_sentences_on_a_corpus_with_numbers(
    documents, store, tiny_spec
):
    """Finding: logit_delta flagged the top 20% of each document's tokens and a sentence
    whenever one of them was in it, so 99% of the tiny corpus's sentences were flagged
    and keep_ratio barely mattered."""
    ref = run_analyze(AnalyzeConfig(**LOGIT_DELTA), documents, tiny_spec, store, QUIET)
    sentences = ref.read_table("sentences").to_pylist()
    flagged = sum(r["impactful"] for r in sentences) / len(sentences)
    assert flagged < 0.9
    # The share is the setting: the top 30% (rounded up) by share of impactful tokens.
    assert flagged == math.ceil(0.3 * len(sentences)) / len(sentences)
    assert ref.info["sentences_flagged_fraction"] == round(flagged, 6)
    assert ref.info["sentences_flagged"] == sum(r["impactful"] for r in sentences)
    assert ref.info["unit"] == "type" and ref.info["warnings"] == []
    share = [r["share"] for r in sentences]
    cut = min(s for s, r in zip(share, sentences, strict=True) if r["impactful"])
    assert all(s <= cut for s, r in zip(share, sentences, strict=True) if not r["impactful"])
    wide = run_analyze(AnalyzeConfig(**LOGIT_DELTA, sentence_fraction=0.6), documents, tiny_spec,
                       store, QUIET)
    rows = wide.read_table("sentences").to_pylist()
    assert sum(r["impactful"] for r in rows) == math.ceil(0.6 * len(rows))
    # The old rule is still there, and warned about: occurrences, any token flags a sentence.
    old = run_analyze(AnalyzeConfig(**LOGIT_DELTA, unit="occurrence", sentence_fraction=1.0),
                      documents, tiny_spec, store, QUIET)
    assert old.info["sentences_flagged_fraction"] > 0.9 and "keep_ratio" in old.info["warnings"][0]


def test_impactful_types_are_the_top_fifth_by_corpus_mean(documents, store, tiny_spec):
    ref = run_analyze(AnalyzeConfig(**LOGIT_DELTA), documents, tiny_spec, store, QUIET)
    stats = ref.read_table("token_stats").to_pylist()
    eligible = [r for r in stats if r["n_scored"] >= 5]
    top = sorted(eligible, key=lambda r: (-r["mean_score"], r["token_id"]))
    want = {r["token_id"] for r in top[: math.ceil(0.2 * len(eligible))]}
    assert {r["token_id"] for r in stats if r["impactful_type"]} == want
    assert ref.info["types"]["impactful_types"] == len(want)
    # The mean is over every scored occurrence in the corpus, and every occurrence of an
    # impactful type is an impactful token (and no other).
    by_id = {r["token_id"]: r for r in stats}
    scores = ref.read_table("token_scores").to_pylist()
    docs = {d["doc_id"]: d for d in ref.read_table("token_scores").to_pylist()}
    ids_of = {r["doc_id"]: r["input_ids"] for r in documents.read_table("documents").to_pylist()}
    tid = top[0]["token_id"]
    vals = [s for d in scores for t, s in zip(ids_of[d["doc_id"]], d["score"], strict=True)
            if t == tid and s == s]
    assert by_id[tid]["mean_score"] == pytest.approx(np.mean(vals), rel=1e-5)
    for doc_id, d in docs.items():
        assert d["impactful"] == [t in want for t in ids_of[doc_id]]
    assert by_id[tid]["n_impactful"] == by_id[tid]["count"]
    # Categories: the byte tokenizer's digits, punctuation and spaces.
    cat = {r["token"]: r["category"] for r in stats}
    assert cat["7"] == "number" and cat["."] == "punctuation" and cat[" "] == "space"


def test_resume_in_the_sentence_step_matches_an_uninterrupted_run(
    documents, store, tiny_spec, tmp_path, monkeypatch
):
    cfg = AnalyzeConfig(**LOGIT_DELTA)
    clean = run_analyze(cfg, documents, tiny_spec, ArtifactStore(tmp_path / "clean"), QUIET)
    real, calls = analyze_mod.sentences_table, []

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(analyze_mod, "sentences_table", dies_on_the_second)
    with pytest.raises(RuntimeError, match="killed"):
        run_analyze(cfg, documents, tiny_spec, store, QUIET)
    monkeypatch.setattr(analyze_mod, "sentences_table", real)
    resumed = run_analyze(cfg, documents, tiny_spec, store, QUIET)
    assert resumed.info["shards_computed"] == 0  # every shard's scores were kept
    for table in ("token_scores", "sentences", "token_stats"):
        assert json.dumps(resumed.read_table(table).to_pylist()) == json.dumps(
            clean.read_table(table).to_pylist()), table


def test_reference_trained_inside_the_dag(documents, store, tiny_spec):
    """H' as in the paper: the base model after a short long-context training (PoSE at the
    target window, a larger RoPE base), its own cached build and train stages."""
    rt = ReferenceTrainingConfig(
        build=BuildConfig(method="pose", train_len=128, target_len=1024, num_samples=4),
        train=TrainConfig(optim=OptimConfig(max_steps=2, lr=1e-3, precision="fp32"),
                          rope=RopeConfig(theta=40000.0)),
    )
    cfg = AnalyzeConfig(method="logit_delta", reference_training=rt, max_context=1024,
                        shard_docs=8, max_documents=3)
    with pytest.raises(AnalyzeError, match="run_reference_training"):
        run_analyze(cfg, documents, tiny_spec, store, QUIET)
    h = run_reference_training(cfg, documents, tiny_spec, store, QUIET)
    assert h.stage == "train" and h.info["rope_parameters"]["rope_theta"] == 40000.0
    assert run_reference_training(cfg, documents, tiny_spec, store, QUIET).key == h.key  # cached
    ref = run_analyze(cfg, documents, tiny_spec, store, QUIET, reference=h)
    assert ref.manifest["inputs"]["reference"] == h.key == ref.info["reference_training"]
    row = ref.read_table("token_scores").to_pylist()[0]
    assert np.nanmax(np.abs(np.array(row["score"], float))) > 1e-3  # H' differs from H
    with pytest.raises(AnalyzeError, match="reference_training is not set"):
        run_analyze(AnalyzeConfig(**LOGIT_DELTA), documents, tiny_spec, store, QUIET, reference=h)


def test_reference_training_is_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot be 'longrecipe'"):
        ReferenceTrainingConfig(build=BuildConfig(method="longrecipe"))
    with pytest.raises(ValidationError, match="only used by method logit_delta"):
        AnalyzeConfig(reference_training=ReferenceTrainingConfig())
    with pytest.raises(ValidationError, match="both set"):
        AnalyzeConfig(method="logit_delta", reference_rope=RopeConfig(theta=1e5),
                      reference_training=ReferenceTrainingConfig())


def test_sentence_flags_by_share():
    flags = np.array([1, 0, 0, 1, 1, 0, 0, 0, 0, 1], bool)
    ends = np.array([3, 5, 9, 10])
    n = sentence_counts(flags, ends)
    assert n.tolist() == [1, 2, 0, 1]
    sizes = np.diff(ends, prepend=0)
    # shares 1/3, 1, 0, 1: the top half are the two at 1; ties go to more impactful tokens
    assert flag_sentences(n, sizes, 0.5).tolist() == [False, True, False, True]
    assert flag_sentences(n, sizes, 0.01).tolist() == [False, True, False, False]
    assert flag_sentences(n, sizes, 1.0).tolist() == [True, True, False, True]  # never share 0


@pytest.mark.parametrize("text,special,category", [
    (" 2024", False, "number"), ("7", False, "number"), (" seven", False, "number"),
    (".", False, "punctuation"), (",\"", False, "punctuation"), ("\n", False, "space"),
    (" she", False, "pronoun"), ("The", False, "determiner"), (" and", False, "conjunction"),
    ("\u2581of", False, "adposition"), (" was", False, "auxiliary"), ("'s", False, "auxiliary"),
    (" river", False, "word"), ("ing", False, "subword"), ("in", False, "subword"),
    ("Enter", False, "word"), ("EL", False, "subword"), ("'t", False, "subword"),
    ("<|eos|>", True, "special"), ("\u00e9\u00b7", False, "other"),
])
def test_token_categories(text, special, category):
    assert token_category(text, special) == category
