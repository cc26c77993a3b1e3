"""The analyze stage: exact log-probs, window plans, selection, tables, resume, bad input."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from longrecipe import (
    AnalyzeConfig,
    ArtifactStore,
    IngestConfig,
    ModelSpec,
    RopeConfig,
    SourceSpec,
    load_model,
    run_ingest,
)
from longrecipe import analyze as analyze_mod
from longrecipe import scoring as scoring_mod
from longrecipe.analyze import AnalyzeError, rope_reference, run_analyze, select_impactful
from longrecipe.artifacts import StageSpec
from longrecipe.ingest import DOCUMENTS_SCHEMA
from longrecipe.logprobs import gather_logprobs, long_windows, score_windows, short_windows
from tests.conftest import DEMO_GGUF, QUIET

# Small enough that the fixture's ~1,000-token documents are chunked.
LSD = AnalyzeConfig(max_context=256, short_window=64, short_stride=16, shard_docs=4)


@pytest.fixture(scope="module")
def tiny_model():
    from longrecipe import TinyModelConfig

    torch.manual_seed(0)
    return load_model(ModelSpec(source="tiny", tiny=TinyModelConfig(max_position_embeddings=256)))


def naive_logprobs(model, ids: np.ndarray) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1 from the model's own full logits."""
    x = torch.from_numpy(ids.astype(np.int64))[None]
    with torch.inference_mode():
        logits = model(
            input_ids=x,
            position_ids=torch.arange(len(ids))[None],
            attention_mask=torch.ones_like(x),
        ).logits[0]
    lp = torch.log_softmax(logits.float(), -1)[:-1].gather(-1, x[0, 1:, None])[:, 0]
    return lp.numpy()


def as_json(table: pa.Table) -> str:
    return json.dumps(table.to_pylist())


def random_doc(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


# --------------------------------------------------------------------------- log-probs


def test_gather_logprobs_equals_full_log_softmax():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(50, 16)
    targets = torch.randint(0, 300, (50,))
    full = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None])[:, 0]
    for chunk in (7, 50, 1000):  # several chunks, one exact chunk, one oversized
        got = gather_logprobs(hidden, targets, head, chunk=chunk)
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_long_pass_equals_naive_for_batched_padded_documents(tiny_model):
    docs = [random_doc(n, s) for s, n in enumerate((40, 97, 64, 2))]
    windows = [w for i, d in enumerate(docs) for w in long_windows(i, len(d), 128, 64)]
    # A budget of 150 tokens packs the short windows together, right-padded.
    lp, ctx = score_windows(tiny_model, docs, windows, batch_tokens=150)
    for d, got, c in zip(docs, lp, ctx, strict=True):
        assert math.isnan(got[0]) and c[0] == -1
        np.testing.assert_allclose(got[1:], naive_logprobs(tiny_model, d), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(c[1:], np.arange(1, len(d)))


def test_chunked_long_pass_records_real_context(tiny_model):
    doc = random_doc(300, 7)
    windows = long_windows(0, 300, 100, 60)
    lp, ctx = score_windows(tiny_model, [doc], windows, batch_tokens=1000)
    lp, ctx = lp[0], ctx[0]
    assert np.isfinite(lp[1:]).all() and (ctx[1:] >= 1).all()
    np.testing.assert_array_equal(ctx[1:100], np.arange(1, 100))  # the first chunk: whole prefix
    assert ctx[100:].min() >= 60 and ctx[100:].max() <= 99
    # Each token's log-prob is the model run on exactly the context the table says it had.
    for t in (1, 99, 100, 139, 140, 201, 299):
        c = int(ctx[t])
        ref = naive_logprobs(tiny_model, doc[t - c : t + 1])[-1]
        assert abs(lp[t] - ref) < 1e-5, (t, c)


def test_short_pass_equals_truncated_contexts(tiny_model):
    doc = random_doc(200, 3)
    W, S = 48, 16
    lp, ctx = score_windows(tiny_model, [doc], short_windows(0, 200, W, S), batch_tokens=64)
    lp, ctx = lp[0], ctx[0]
    assert (ctx[: W + 1] == -1).all()  # whole prefix fits: left to the long pass
    assert ctx[W + 1 :].min() == W - S + 1 and ctx[W + 1 :].max() == W
    for t in (W + 1, W + 2, 80, 137, 199):
        c = int(ctx[t])
        ref = naive_logprobs(tiny_model, doc[t - c : t + 1])[-1]
        assert abs(lp[t] - ref) < 1e-5, (t, c)


def test_window_plans_cover_every_token_once():
    for n, m, c in ((1, 8, 4), (8, 8, 4), (9, 8, 4), (1000, 256, 128), (1001, 256, 200)):
        hits = np.zeros(n, int)
        for w in long_windows(0, n, m, c):
            assert w.length <= m
            hits[w.start + w.score_from : w.end] += 1
        assert hits[0] == 0 and (hits[1:] == 1).all(), (n, m, c)
    hits = np.zeros(500, int)
    for w in short_windows(0, 500, 64, 16):
        hits[w.start + w.score_from : w.end] += 1
    assert (hits[:65] == 0).all() and (hits[65:] == 1).all()


# --------------------------------------------------------------------------- selection


def test_top_fraction_picks_the_highest_scores():
    score = np.array([np.nan, 0.5, 3.0, -1.0, 2.0, 0.1, 9.0, np.nan, 0.0, 1.0, 4.0], np.float32)
    cfg = AnalyzeConfig(method="lsd", selection="top_fraction", top_fraction=0.3, max_context=1024)
    flags = select_impactful(score, np.zeros_like(score), cfg)
    # 9 scored tokens: ceil(0.3 * 9) = 3 -> the scores 9, 4 and 3.
    assert flags.sum() == 3
    assert set(np.flatnonzero(flags)) == {6, 10, 2}
    assert not flags[[0, 7]].any()
    one = AnalyzeConfig(method="lsd", selection="top_fraction", top_fraction=1.0, max_context=1024)
    assert select_impactful(score, score, one).sum() == 9


def test_thresholds_per_method():
    score = np.array([np.nan, 2.5, 2.5, 1.0, 5.0], np.float32)
    logprob = np.array([np.nan, -1.0, -3.0, -0.1, -2.0], np.float32)
    lsd = AnalyzeConfig(method="lsd", max_context=1024)  # auto -> threshold (LongPPL)
    assert lsd.effective_selection == "threshold"
    # LSD > 2 and long log-prob > -2 (strict: -2.0 itself fails).
    assert select_impactful(score, logprob, lsd).tolist() == [False, True, False, False, False]
    delta = AnalyzeConfig(method="logit_delta", reference_rope=RopeConfig(theta=1e5), threshold=2.0,
                          selection="threshold")
    assert select_impactful(score, logprob, delta).tolist() == [False, True, True, False, True]
    auto = AnalyzeConfig(method="logit_delta", reference_rope=RopeConfig(theta=1e5))
    assert auto.effective_selection == "top_fraction"


def test_bad_configs_name_the_field():
    with pytest.raises(ValidationError, match="analyze.reference"):
        AnalyzeConfig(method="logit_delta")
    with pytest.raises(ValidationError, match="both set"):
        AnalyzeConfig(method="logit_delta", reference=ModelSpec(), reference_rope=RopeConfig())
    with pytest.raises(ValidationError, match="changes nothing"):
        AnalyzeConfig(method="logit_delta", reference_rope=RopeConfig())
    with pytest.raises(ValidationError, match="reference_rope.factor"):
        AnalyzeConfig(method="logit_delta", reference_rope=RopeConfig(type="linear"))
    with pytest.raises(ValidationError, match="analyze.short_window"):
        AnalyzeConfig(max_context=256, short_window=200)
    with pytest.raises(ValidationError, match="analyze.short_stride"):
        AnalyzeConfig(short_window=16, short_stride=32)


# --------------------------------------------------------------------------- the stage


def train_docs(documents) -> list[dict]:
    rows = documents.read_table("documents").to_pylist()
    return [r for r in rows if r["split"] == "train"]


def test_tables_align_with_documents(documents, store, tiny_spec):
    ref = run_analyze(LSD, documents, tiny_spec, store, QUIET)
    docs = train_docs(documents)
    assert 0 < len(docs) < documents.manifest["tables"]["documents"]["rows"]  # heldout skipped
    scores = ref.read_table("token_scores").to_pylist()
    assert [s["doc_id"] for s in scores] == [d["doc_id"] for d in docs]
    for s, d in zip(scores, docs, strict=True):
        n = d["n_tokens"]
        for col in ("logprob", "logprob_short", "score", "impactful", "context"):
            assert len(s[col]) == n, col
        assert s["logprob_ref"] is None
        assert math.isnan(s["score"][0]) and s["context"][0] == 0
        assert max(s["context"]) <= LSD.max_context - 1
        assert min(s["context"][LSD.max_context :]) >= LSD.max_context // 2
        # Tokens within the short window see the same context in both passes: LSD 0.
        head = slice(1, LSD.short_window + 1)
        assert s["logprob_short"][head] == s["logprob"][head]
    sentences = ref.read_table("sentences").to_pylist()
    for d, s in zip(docs, scores, strict=True):
        mine = [r for r in sentences if r["doc_id"] == d["doc_id"]]
        assert [r["end"] for r in mine] == d["sentence_ends"]
        assert [r["start"] for r in mine] == [0, *d["sentence_ends"][:-1]]
        assert [r["sentence_index"] for r in mine] == list(range(len(mine)))
        for r in mine:
            flags = s["impactful"][r["start"] : r["end"]]
            assert r["n_impactful"] == sum(flags)
            assert r["n_tokens"] == r["end"] - r["start"]
            assert r["share"] == pytest.approx(sum(flags) / r["n_tokens"])
            assert not r["impactful"] or r["n_impactful"] > 0
    # The top sentence_fraction of all sentences by share of impactful tokens, rounded up.
    assert sum(r["impactful"] for r in sentences) == min(
        math.ceil(LSD.sentence_fraction * len(sentences)), sum(r["n_impactful"] > 0 for r in sentences))
    assert ref.info["sentences"] == len(sentences)
    assert ref.info["sentences_flagged"] == sum(r["impactful"] for r in sentences)
    stats = ref.read_table("token_stats").to_pylist()
    all_ids = [t for d in docs for t in d["input_ids"]]
    assert sum(r["count"] for r in stats) == len(all_ids)
    assert {r["token_id"] for r in stats} == set(all_ids)
    info = ref.info
    assert info["method"] == "lsd" and info["model"] == ref.manifest["inputs"]["model"]
    assert info["tokens"] == len(all_ids) and info["context_min_truncated"] >= 128
    assert info["thresholds"] == {"lsd_alpha": 2.0, "lsd_beta": -2.0}


def test_resume_after_a_failed_shard_matches_an_uninterrupted_run(
    documents, store, tiny_spec, tmp_path, monkeypatch
):
    clean = run_analyze(LSD, documents, tiny_spec, ArtifactStore(tmp_path / "clean"), QUIET)
    real = scoring_mod.Scorer.score
    calls = {"n": 0}

    def flaky(self, docs, advance):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(self, docs, advance)

    monkeypatch.setattr(scoring_mod.Scorer, "score", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        run_analyze(LSD, documents, tiny_spec, store, QUIET)
    key = analyze_mod.analyze_spec(LSD, documents, analyze_mod.resolve(tiny_spec)).key
    part0 = store.root + f"/analyze/{key}.partial/token_scores/part-00000.parquet"
    assert store.get("analyze", key) is None and os.path.exists(part0)
    mtime = os.stat(part0).st_mtime_ns
    monkeypatch.setattr(scoring_mod.Scorer, "score", real)
    ref = run_analyze(LSD, documents, tiny_spec, store, QUIET)
    assert ref.manifest["timings"]["resumed_parts"] == 1
    assert ref.info["shards_computed"] == ref.info["shards"] - 1
    assert os.stat(f"{ref.uri}/token_scores/part-00000.parquet").st_mtime_ns == mtime
    for table in ("token_scores", "sentences", "token_stats"):
        # NaN (token 0) never equals itself in Arrow: compare the JSON text instead.
        assert as_json(ref.read_table(table)) == as_json(clean.read_table(table)), table
    assert ref.key == clean.key


def test_logit_delta_rope_reference(documents, store, tiny_spec):
    same = AnalyzeConfig(method="logit_delta", reference=tiny_spec, max_context=256, shard_docs=8)
    ref = run_analyze(same, documents, tiny_spec, store, QUIET)
    row = ref.read_table("token_scores").to_pylist()[0]
    assert ref.manifest["inputs"]["reference"] == ref.manifest["inputs"]["model"]
    assert np.nanmax(np.abs(np.array(row["score"], float))) == 0  # identical models: no delta
    assert row["logprob_short"] is None
    cfg = AnalyzeConfig(method="logit_delta", reference_rope=RopeConfig(type="linear", factor=4.0),
                        max_context=256, shard_docs=8, top_fraction=0.25, unit="occurrence")
    ref = run_analyze(cfg, documents, tiny_spec, store, QUIET)
    for row in ref.read_table("token_scores").to_pylist():
        score = np.array(row["score"], float)
        assert np.nanmax(np.abs(score)) > 1e-3
        np.testing.assert_allclose(score[1:], np.subtract(row["logprob_ref"], row["logprob"])[1:],
                                   atol=1e-6)
        assert sum(row["impactful"]) == math.ceil(0.25 * (len(score) - 1))
    assert ref.info["reference_rope"]["type"] == "linear"


def test_rope_reference_rebuilds_the_rotary_module(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model)
    before = model.model.rotary_emb.inv_freq.clone()
    rope_reference(model, RopeConfig(theta=500000.0))
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    assert not torch.allclose(model.model.rotary_emb.inv_freq, before)
    doc = random_doc(64, 5)
    assert not np.allclose(naive_logprobs(model, doc), naive_logprobs(tiny_model, doc), atol=1e-4)
    yarn = rope_reference(copy.deepcopy(tiny_model), RopeConfig(type="yarn", factor=4.0))
    assert yarn.config.max_position_embeddings == 1024
    assert yarn.config.rope_parameters["original_max_position_embeddings"] == 256


def test_digits_rule_on_hand_made_sentences(tmp_path, store, tiny_spec):
    text = "I have 3 cats. No numbers here! In 2024 it rained?\nPlain end."
    corpus = tmp_path / "d.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n")
    docs = run_ingest(IngestConfig(sources=[SourceSpec(path=str(corpus))]), tiny_spec, store, QUIET)
    ref = run_analyze(AnalyzeConfig(method="digits"), docs, tiny_spec, store, QUIET)
    sentences = ref.read_table("sentences").to_pylist()
    assert [s["text"].strip() for s in sentences] == [
        "I have 3 cats.", "No numbers here!", "In 2024 it rained?", "Plain end."
    ]
    assert [s["impactful"] for s in sentences] == [True, False, True, False]
    assert [s["n_impactful"] for s in sentences] == [1, 0, 4, 0]
    row = ref.read_table("token_scores").to_pylist()[0]
    flagged = "".join(text[i] for i, f in enumerate(row["impactful"]) if f)  # byte tokens
    assert flagged == "32024"
    assert row["logprob"] is None and row["context"] is None
    stats = {r["token"]: r for r in ref.read_table("token_stats").to_pylist()}
    assert stats["2"]["count"] == 2 and stats["2"]["impactful_rate"] == 1.0
    assert stats["a"]["impactful_rate"] == 0.0


def test_token_ids_outside_the_vocabulary_are_refused(store, tiny_spec):
    bad = pa.Table.from_pylist(
        [{"doc_id": "bad-doc", "source": "x", "split": "train", "text": "?", "n_tokens": 3,
          "input_ids": [1, 2, 99999], "sentence_ends": [3]}],
        schema=DOCUMENTS_SCHEMA,
    )
    docs = store.produce(StageSpec("ingest", "test", {"bad": 1}),
                         lambda w: w.write_part("documents", 0, bad))
    with pytest.raises(AnalyzeError, match="bad-doc"):
        run_analyze(LSD, docs, tiny_spec, store, QUIET)
    key = analyze_mod.analyze_spec(LSD, docs, analyze_mod.resolve(tiny_spec)).key
    assert store.get("analyze", key) is None


# --------------------------------------------------------------------------- demo model


@pytest.mark.slow
@pytest.mark.skipif(not DEMO_GGUF.exists(), reason="demo model not fetched")
def test_lsd_finds_the_repeated_pass_key(tmp_path, store):
    """The proof that the stage measures what LongPPL means: digits of a pass key seen long
    before (beyond the short window) are far better predicted with the long context."""
    key = "71432"
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
              "There and back again. ") * 24
    text = f"The pass key is {key}. Remember it. {filler}The pass key is {key}. Remember it."
    corpus = tmp_path / "k.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n")
    model = ModelSpec(source=str(DEMO_GGUF))
    docs = run_ingest(IngestConfig(sources=[SourceSpec(path=str(corpus))]), model, store, QUIET)
    cfg = AnalyzeConfig(max_context=2048, short_window=128, short_stride=64)
    ref = run_analyze(cfg, docs, model, store, QUIET)
    row = ref.read_table("token_scores").to_pylist()[0]
    ids = docs.read_table("documents").column("input_ids")[0].as_py()
    from longrecipe import load_tokenizer

    tok = load_tokenizer(model)
    pieces = [tok.decode([t]) for t in ids]
    lsd = np.array(row["score"], float)
    # The digits of the second pass key: after the filler, more than W tokens after the first.
    first_end = next(i for i, p in enumerate(pieces) if "Remember" in p)
    second = [i for i, p in enumerate(pieces) if any(c.isdigit() for c in p) and i > first_end]
    assert second and min(second) > cfg.short_window
    filler_idx = np.arange(first_end + 10, min(second) - 8)
    key_lsd, filler_lsd = lsd[second].mean(), np.nanmean(lsd[filler_idx])
    print(f"pass-key digits LSD {key_lsd:.2f} vs filler {filler_lsd:.2f}")
    assert key_lsd > 2.0 and key_lsd > filler_lsd + 2.0
    assert all(row["impactful"][i] for i in second)
