"""The build stage: samples, positions and coverage over whole artifacts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

import longrecipe.build as build_mod
from longrecipe import ArtifactStore, BuildConfig, RuntimeConfig, StageSpec
from longrecipe.build import BuildError, build_spec, check_samples, run_build
from longrecipe.positions import InvariantError

QUIET = RuntimeConfig(progress=False, device="cpu")
METHODS = ["full", "randomized", "pose", "longrecipe"]


@pytest.fixture(scope="session")
def digit_ids(tiny_spec) -> np.ndarray:
    from longrecipe import load_tokenizer

    tok = load_tokenizer(tiny_spec)
    return np.array(
        [i for d in "0123456789" for i in tok(d, add_special_tokens=False)["input_ids"]]
    )


def fake_analysis(store, documents, digits):
    """An `analyze` artifact with a `sentences` table taken from documents.sentence_ends;
    a sentence is impactful when it holds a digit token (the public code's rule)."""
    t = documents.read_table("documents", columns=["doc_id", "split", "input_ids", "sentence_ends"])
    rows = {
        k: []
        for k in [
            "doc_id",
            "sentence_index",
            "start",
            "end",
            "n_tokens",
            "n_impactful",
            "max_score",
            "impactful",
        ]
    }
    for doc_id, split, ids, ends in zip(
        *(t.column(c).to_pylist() for c in t.column_names), strict=True
    ):
        if split != "train":
            continue  # the analysis stage only scores training documents
        ids = np.array(ids)
        start = 0
        for j, end in enumerate(ends):
            digit = np.isin(ids[start:end], digits)
            flag = bool(digit.any())
            for k, v in zip(
                rows, [doc_id, j, start, end, end - start, int(digit.sum()), 1.0, flag], strict=True
            ):
                rows[k].append(v)
            start = end
    table = pa.table(rows)

    def body(w):
        w.write_table("sentences", table)

    return store.produce(
        StageSpec("analyze", "test_v1", {"n": 1}, {"documents": documents.key}), body
    )


@pytest.fixture
def analysis(store, documents, digit_ids):
    return fake_analysis(store, documents, digit_ids)


def positions_of(ref) -> list[np.ndarray]:
    return [np.array(p) for p in ref.read_table("samples").column("position_ids").to_pylist()]


def sentence_sets(ref, analysis):
    """(doc_id, sentence_index) fully or partly inside some sample, and the walked ones."""
    s = analysis.read_table("sentences").to_pylist()
    by_doc = {}
    for r in s:
        by_doc.setdefault(r["doc_id"], []).append(r)
    covered = set()
    for spans in ref.read_table("samples").column("spans").to_pylist():
        for sp in spans:
            for r in by_doc[sp["doc_id"]]:
                if r["start"] < sp["end"] and sp["start"] < r["end"]:
                    covered.add((r["doc_id"], r["sentence_index"]))
    return s, covered


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("method", METHODS)
def test_every_method_meets_the_invariants(store, documents, analysis, method):
    cfg = BuildConfig(method=method, train_len=200, target_len=700, shard_samples=4)
    ref = run_build(cfg, documents, analysis, store, QUIET)
    facts = check_samples(ref, store)  # alignment with the documents, positions, heads
    n = ref.manifest["tables"]["samples"]["rows"]
    assert facts["samples"] == n >= 8
    assert ref.manifest["tables"]["samples"]["parts"] == -(-n // 4)
    t = ref.read_table("samples")
    length = 700 if method == "full" else 200
    assert set(t.column("n_tokens").to_pylist()) == {length}
    assert set(t.column("method").to_pylist()) == {method}
    for ids, pos in zip(
        t.column("input_ids").to_pylist(), t.column("position_ids").to_pylist(), strict=True
    ):
        assert len(ids) == len(pos) == length and pos[0] == 0 and max(pos) < 700
        assert all(b > a for a, b in zip(pos, pos[1:], strict=False))


def test_longrecipe_source_rule_meets_the_invariants(store, documents, analysis):
    cfg = BuildConfig(train_len=150, target_len=600, gap_rule="source", shard_samples=8)
    ref = run_build(cfg, documents, analysis, store, QUIET)
    assert check_samples(ref, store)["samples"] > 10


def test_check_samples_catches_misaligned_positions(store, documents, analysis, monkeypatch):
    # The public code's bug: positions made for one token list applied to another.
    # Shift every sample's tokens by one source token: spans no longer match input_ids.
    cfg = BuildConfig(train_len=120, target_len=500, shard_samples=100)
    real = build_mod.DocumentTokens.gather

    def shifted(self, doc, start, length):
        return real(self, doc, np.maximum(start - 1, 0), length)

    monkeypatch.setattr(build_mod.DocumentTokens, "gather", shifted)
    ref = run_build(cfg, documents, analysis, store, QUIET)
    monkeypatch.setattr(build_mod.DocumentTokens, "gather", real)
    with pytest.raises(InvariantError, match="differ from the documents' tokens"):
        check_samples(ref, store)


def test_check_samples_catches_a_gap_inside_a_sentence(store, documents, analysis):
    ref = run_build(BuildConfig(train_len=150, target_len=600), documents, analysis, store, QUIET)
    t = ref.read_table("samples")
    pos = [np.array(p) for p in t.column("position_ids").to_pylist()]
    k, p = next(
        (k, p)
        for k, p in enumerate(pos)
        if (np.diff(p[t.column("head_len")[k].as_py() :]) > 1).any()
    )
    # Move one gap a token later: still increasing and in the window, but now the jump
    # lands inside a kept sentence (sentences here are longer than one token).
    j = int(np.flatnonzero(np.diff(p) > 1)[-1]) + 1
    p = p.copy()
    p[j] = p[j - 1] + 1
    pos[k] = p
    bad = t.set_column(
        t.column_names.index("position_ids"),
        "position_ids",
        pa.array([x.tolist() for x in pos], pa.list_(pa.int32())),
    )
    tampered = store.produce(
        StageSpec("build", "tampered", ref.manifest["config"], ref.manifest["inputs"]),
        lambda w: w.write_table("samples", bad),
    )
    with pytest.raises(
        InvariantError, match=f"sample {k}: a gap inside a kept sentence at token {j + 1}"
    ):
        check_samples(tampered, store)


def test_full_packs_short_documents_in_order(store, documents):
    # Documents hold about 1,000 tokens; windows of 2,500 must cross into the next ones.
    ref = run_build(BuildConfig(method="full", target_len=2500), documents, None, store, QUIET)
    check_samples(ref, store)
    t = ref.read_table("samples")
    assert all(p == list(range(2500)) for p in t.column("position_ids").to_pylist())
    assert all(len(d) >= 2 for d in t.column("doc_ids").to_pylist())
    # Consecutive samples continue each other: the stream is cut, nothing skipped.
    spans = t.column("spans").to_pylist()
    assert spans[1][0]["start"] == spans[0][-1]["end"] or spans[1][0]["start"] == 0
    train = documents.read_table("documents").filter(
        pa.compute.equal(pa.compute.field("split"), "train")
    )
    total = sum(train.column("n_tokens").to_pylist()) + train.num_rows  # each with its EOS
    assert (
        ref.info["tokens"] == t.num_rows * 2500
        and ref.info["leftover_tokens"] == total - t.num_rows * 2500
    )


@pytest.mark.parametrize("method", ["full", "longrecipe"])
def test_eos_between_packed_documents(store, documents, analysis, method):
    """Every document in a sample is followed by the tokenizer's EOS (the id ingest
    recorded): the old build packed documents with nothing between them."""
    eos = documents.info["special_tokens"]["eos_token_id"]
    assert eos == 257  # the byte tokenizer's
    cfg = BuildConfig(method=method, train_len=400, target_len=2500)
    ref = run_build(cfg, documents, analysis, store, QUIET)
    check_samples(ref, store)
    assert ref.info["eos_token_id"] == eos
    n_tokens = dict(zip(*(documents.read_table("documents").column(c).to_pylist()
                          for c in ("doc_id", "n_tokens")), strict=True))
    crossings = 0
    for ids, spans in zip(*(ref.read_table("samples").column(c).to_pylist()
                            for c in ("input_ids", "spans")), strict=True):
        at = 0
        for sp in spans:
            at += sp["end"] - sp["start"]
            if sp["end"] == n_tokens[sp["doc_id"]] + 1:  # the span ends its document
                assert ids[at - 1] == eos
                crossings += 1
        assert at == len(ids)
        # Documents never run into each other: between two documents there is an EOS.
        doc_of = [sp["doc_id"] for sp in spans]
        for a, b, sp in zip(doc_of, doc_of[1:], spans, strict=False):
            if a != b:
                assert sp["end"] == n_tokens[a] + 1, (a, b)
    assert crossings >= 2


def test_bos_policy_reaches_the_samples(tmp_path, store):
    """A tokenizer that adds BOS (Llama-style) gets it at every document start in ingest,
    so training sees BOS after every EOS, as perplexity and evaluation prompts do."""
    from longrecipe import IngestConfig, ModelSpec, SourceSpec, TinyModelConfig, run_ingest
    from longrecipe.synthetic import write_filler_corpus

    corpus = write_filler_corpus(tmp_path / "c.jsonl", n_docs=4, sentences=20)
    spec = ModelSpec(tiny=TinyModelConfig(add_bos=True))
    docs = run_ingest(IngestConfig(sources=[SourceSpec(path=str(corpus))]), spec, store, QUIET)
    assert docs.info["special_tokens"] == {"bos_token_id": 256, "adds_bos": True,
                                           "eos_token_id": 257}
    rows = docs.read_table("documents").to_pylist()
    assert all(r["input_ids"][0] == 256 and 256 not in r["input_ids"][1:] for r in rows)
    assert all(not r["text"].startswith("<") for r in rows)
    ref = run_build(BuildConfig(method="full", target_len=1500), docs, None, store, QUIET)
    ids = [t for s in ref.read_table("samples").column("input_ids").to_pylist() for t in s]
    after_eos = [ids[i + 1] for i, t in enumerate(ids[:-1]) if t == 257]
    assert after_eos and set(after_eos) == {256}


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("method", ["randomized", "pose", "longrecipe"])
def test_seeded_and_deterministic(tmp_path, documents, analysis, store, method):
    cfg = BuildConfig(method=method, train_len=200, target_len=900, shard_samples=3)
    a = run_build(cfg, documents, analysis, store, QUIET)
    other = ArtifactStore(tmp_path / "other")
    b = run_build(cfg, documents, analysis, other, QUIET)  # same inputs, fresh store
    assert a.read_table("samples").equals(b.read_table("samples"))
    c = run_build(cfg.model_copy(update={"seed": 1}), documents, analysis, store, QUIET)
    assert c.key != a.key
    assert any(
        not np.array_equal(x, y) for x, y in zip(positions_of(a), positions_of(c), strict=False)
    )


def test_resume_after_a_failure_gives_identical_samples(
    tmp_path, store, documents, analysis, monkeypatch
):
    cfg = BuildConfig(train_len=100, target_len=400, shard_samples=5)
    clean = run_build(cfg, documents, analysis, ArtifactStore(tmp_path / "clean"), QUIET)
    real, calls = build_mod.build_samples, []

    def dies_on_third_part(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "build_samples", dies_on_third_part)
    with pytest.raises(RuntimeError, match="killed"):
        run_build(cfg, documents, analysis, store, QUIET)
    assert store.get("build", clean.key) is None  # nothing marked complete
    monkeypatch.setattr(build_mod, "build_samples", real)
    resumed = run_build(cfg, documents, analysis, store, QUIET)
    assert resumed.key == clean.key
    assert resumed.manifest["timings"]["resumed_parts"] == 2
    assert resumed.read_table("samples").equals(clean.read_table("samples"))
    assert resumed.read_table("coverage").equals(clean.read_table("coverage"))
    assert resumed.info == clean.info


# --------------------------------------------------------------------------- selection


def test_longrecipe_keeps_every_impactful_sentence_and_about_half_the_rest(
    store, documents, analysis
):
    cfg = BuildConfig(train_len=100, target_len=400)
    ref = run_build(cfg, documents, analysis, store, QUIET)
    sents, covered = sentence_sets(ref, analysis)
    walked = ref.info["selection"]["walked_sentences"]
    # Sentences are walked document by document in artifact order (the table's order).
    walk = sents[:walked]
    impactful = [(r["doc_id"], r["sentence_index"]) for r in walk if r["impactful"]]
    other = [(r["doc_id"], r["sentence_index"]) for r in walk if not r["impactful"]]
    assert len(impactful) > 20 and len(other) > 100
    assert all(k in covered for k in impactful)
    rate = sum(k in covered for k in other) / len(other)
    assert 0.4 < rate < 0.6
    sel = ref.info["selection"]
    assert sel["kept_impactful"] == sel["impactful_sentences"] == len(impactful)
    assert sel["kept_other"] == sum(k in covered for k in other)


@pytest.mark.parametrize("ratio,lo,hi", [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.2, 0.1, 0.3)])
def test_keep_ratio(store, documents, analysis, ratio, lo, hi):
    ref = run_build(
        BuildConfig(train_len=100, target_len=400, keep_ratio=ratio),
        documents,
        analysis,
        store,
        QUIET,
    )
    assert lo <= ref.info["selection"]["keep_rate_other"] <= hi


def test_the_rt_head(store, documents, analysis):
    L = 120
    ref = run_build(BuildConfig(train_len=L, target_len=500), documents, analysis, store, QUIET)
    t = ref.read_table("samples")
    heads = t.column("head_len").to_pylist()
    assert all(1 <= h <= (L + 1) // 2 for h in heads) and len(set(heads)) > 3
    for h, pos in zip(heads, t.column("position_ids").to_pylist(), strict=True):
        assert pos[:h] == list(range(h))
    fixed = run_build(
        BuildConfig(train_len=L, target_len=500, head_rule="fixed", head_len=40),
        documents,
        analysis,
        store,
        QUIET,
    )
    t = fixed.read_table("samples")
    assert set(t.column("head_len").to_pylist()) == {40}
    assert all(p[:40] == list(range(40)) for p in t.column("position_ids").to_pylist())


def _hand_made(store, sentences: list[tuple[int, bool]]):
    """One document of the given (length, impactful) sentences, tokens 0..n-1 (mod 250)."""
    n = sum(k for k, _ in sentences)
    ends = np.cumsum([k for k, _ in sentences]).tolist()
    docs = pa.table(
        {
            "doc_id": ["d0"],
            "source": ["hand"],
            "split": ["train"],
            "text": ["x"],
            "n_tokens": pa.array([n], pa.int32()),
            "input_ids": pa.array([(np.arange(n) % 250).tolist()], pa.list_(pa.int32())),
            "sentence_ends": pa.array([ends], pa.list_(pa.int32())),
        }
    )
    def write(w):
        w.write_table("documents", docs)
        w.info.update(special_tokens={"bos_token_id": 256, "adds_bos": False, "eos_token_id": 257})

    documents = store.produce(StageSpec("ingest", "test_v1", {"hand": sentences}, {}), write)
    starts = [0, *ends[:-1]]
    sents = pa.table(
        {
            "doc_id": ["d0"] * len(sentences),
            "sentence_index": list(range(len(sentences))),
            "start": starts,
            "end": ends,
            "impactful": [f for _, f in sentences],
        }
    )
    analysis = store.produce(
        StageSpec("analyze", "test_v1", {"hand": sentences}, {"documents": documents.key}),
        lambda w: w.write_table("sentences", sents),
    )
    return documents, analysis


def test_source_rule_on_a_hand_made_document(store):
    # Impactful sentences of 10 tokens at source 0, 30, 100, 200; fillers dropped (keep 0).
    layout = [(10, True), (20, False), (10, True), (60, False), (10, True), (90, False), (10, True)]
    documents, analysis = _hand_made(store, layout)
    cfg = BuildConfig(
        train_len=40, target_len=1000, keep_ratio=0.0, head_rule="none", gap_rule="source"
    )
    ref = run_build(cfg, documents, analysis, store, QUIET)
    t = ref.read_table("samples")
    assert t.num_rows == 1
    true = np.r_[0:10, 30:40, 100:110, 200:210]
    assert t.column("position_ids")[0].as_py() == true.tolist()  # the real offsets
    assert t.column("input_ids")[0].as_py() == (true % 250).tolist()
    assert [(s["start"], s["end"]) for s in t.column("spans")[0].as_py()] == [
        (0, 10),
        (30, 40),
        (100, 110),
        (200, 210),
    ]
    # Document longer than the window: gaps (20, 60, 90) scaled into 130 - 40 = 90 spare
    # positions, cumulatively rounded down: 20*90//170 = 10, 80*90//170 = 42, 90.
    small = run_build(cfg.model_copy(update={"target_len": 130}), documents, analysis, store, QUIET)
    pos = np.array(small.read_table("samples").column("position_ids")[0].as_py())
    starts = pos[[0, 10, 20, 30]]
    assert (np.diff(pos.reshape(4, 10), axis=1) == 1).all()  # sentences stay contiguous
    assert pos[-1] == 129 and starts.tolist() == [0, 10 + 10, 20 + 42, 30 + 90]
    check_samples(small, store)


def test_random_rule_reaches_the_end_of_the_window(store, documents, analysis):
    ref = run_build(BuildConfig(train_len=150, target_len=1000), documents, analysis, store, QUIET)
    t = ref.read_table("samples")
    assert set(t.column("max_position").to_pylist()) == {999}
    assert ref.info["reach"] == 1.0 and ref.info["distance_coverage"] > 0.9


@pytest.mark.parametrize(
    "method,reach", [("full", 1.0), ("randomized", 0.99), ("pose", 0.6), ("longrecipe", 0.99)]
)
def test_coverage_table_and_summary(store, documents, analysis, method, reach):
    ref = run_build(
        BuildConfig(method=method, train_len=150, target_len=600), documents, analysis, store, QUIET
    )
    info, n = ref.info, ref.manifest["tables"]["samples"]["rows"]
    assert info["samples"] == n and info["reach"] >= reach
    cov = ref.read_table("coverage").to_pylist()
    kinds = {r["kind"] for r in cov}
    assert kinds == {"max_position", "gap", "distance"}
    assert sum(r["count"] for r in cov if r["kind"] == "max_position") == n
    length = 600 if method == "full" else 150
    # Every token pair of every analysed sample is counted at its distance (all samples
    # of a part when it holds no more than DISTANCE_SAMPLES_PER_PART).
    picked = info["distance_samples"]
    assert picked == min(n, build_mod.DISTANCE_SAMPLES_PER_PART)
    assert (
        sum(r["count"] for r in cov if r["kind"] == "distance")
        == picked * length * (length - 1) // 2
    )
    assert sum(r["count"] for r in cov if r["kind"] == "gap") == n * (length - 1)
    last = max((r for r in cov if r["kind"] == "distance"), key=lambda r: r["bin_start"])
    assert last["bin_end"] == 600
    if method == "full":
        assert info["distance_coverage"] == 1.0 and info["mean_gap"] == 0
        assert all(r["count"] == 0 for r in cov if r["kind"] == "gap" and r["bin_start"] > 0)


def test_counts_limit_the_samples(store, documents, analysis):
    a = run_build(
        BuildConfig(train_len=100, target_len=400, num_samples=7), documents, analysis, store, QUIET
    )
    assert a.manifest["tables"]["samples"]["rows"] == 7
    b = run_build(
        BuildConfig(train_len=100, target_len=400, num_tokens=250),
        documents,
        analysis,
        store,
        QUIET,
    )
    assert b.manifest["tables"]["samples"]["rows"] == 3


def test_split_selects_documents(store, documents):
    ref = run_build(
        BuildConfig(method="randomized", train_len=50, target_len=200, split="heldout"),
        documents,
        None,
        store,
        QUIET,
    )
    docs = documents.read_table("documents", columns=["doc_id", "split"]).to_pylist()
    heldout = {d["doc_id"] for d in docs if d["split"] == "heldout"}
    used = {d for ds in ref.read_table("samples").column("doc_ids").to_pylist() for d in ds}
    assert heldout and used <= heldout


# --------------------------------------------------------------------------- keys and bad input


def test_key_ignores_what_the_method_does_not_use(documents, analysis):
    full = BuildConfig(method="full", target_len=512)
    assert (
        build_spec(full, documents, None).key
        == build_spec(
            full.model_copy(update={"train_len": 77, "seed": 5, "keep_ratio": 0.1}),
            documents,
            analysis,
        ).key
    )
    assert "analysis" not in build_spec(full, documents, analysis).inputs
    lr = BuildConfig()
    assert (
        build_spec(lr, documents, analysis).key
        != build_spec(lr.model_copy(update={"keep_ratio": 0.3}), documents, analysis).key
    )


def test_longrecipe_without_analysis_fails_clearly(store, documents, analysis):
    with pytest.raises(BuildError, match="longrecipe needs the analysis artifact"):
        run_build(BuildConfig(), documents, None, store, QUIET)
    # The analysis scores training documents only.
    with pytest.raises(BuildError, match="no sentences for the documents of split 'heldout'"):
        run_build(BuildConfig(split="heldout"), documents, analysis, store, QUIET)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"train_len": 1024, "target_len": 1024},
            "train_len \\(1024\\) must be below build.target_len",
        ),
        ({"method": "pose", "train_len": 2000, "target_len": 1000}, "must be below"),
        ({"method": "yarn"}, "method"),
        ({"head_rule": "fixed", "head_len": 500, "train_len": 300}, "head_len \\(500\\)"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
    ],
)
def test_bad_configs_fail_clearly(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        BuildConfig(**kwargs)


def test_train_len_beyond_the_corpus_fails_clearly(store, documents, analysis):
    with pytest.raises(BuildError, match="fewer than one sample of 90000 \\(build.train_len\\)"):
        run_build(
            BuildConfig(train_len=90000, target_len=100000), documents, analysis, store, QUIET
        )
    assert not list(store.iter_refs("build"))


def test_bad_analysis_fails_clearly(store, documents, digit_ids):
    other = fake_analysis(store, documents, digit_ids)
    t = other.read_table("sentences")
    # Overlapping sentences: row 1 starts inside row 0.
    starts = t.column("start").to_pylist()
    starts[1] = 1
    bad = t.set_column(
        t.column_names.index("start"), "start", pa.array(starts, t.schema.field("start").type)
    )
    ref = store.produce(
        StageSpec("analyze", "test_v1", {"bad": 1}, {"documents": documents.key}),
        lambda w: w.write_table("sentences", bad),
    )
    with pytest.raises(BuildError, match="sentences row 1 overlaps"):
        run_build(BuildConfig(), documents, ref, store, QUIET)
    # An analysis made from other documents.
    stray = store.produce(
        StageSpec("analyze", "test_v1", {"stray": 1}, {"documents": "0" * 16}),
        lambda w: w.write_table("sentences", t),
    )
    with pytest.raises(BuildError, match="made from documents/0000000000000000"):
        run_build(BuildConfig(), documents, stray, store, QUIET)
