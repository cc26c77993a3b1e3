"""The evaluate stage: greedy decoding, perplexity, the whole stage on the tiny model,
resume after a crash, bad input; and the demo model finding a needle (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.compute as pc
import pytest

from longrecipe import ArtifactStore, EvaluateConfig, IngestConfig, ModelSpec, SourceSpec
from longrecipe.evaluate import EvaluateError, evaluate_spec, run_evaluate
from longrecipe.evaluate import suites as suites_mod
from longrecipe.models import byte_tokenizer, load_model, resolve
from tests.conftest import DEMO_GGUF, QUIET, write_corpus

ROOT = Path(__file__).resolve().parents[1]
RULER_DATA = ROOT / "data/external/ruler"
HAS_RULER = all((RULER_DATA / f).exists() for f in ("PaulGrahamEssays.json", "squad.json", "hotpotqa.json"))


@pytest.fixture(scope="module")
def lively():
    """The tiny model with large random weights: varied greedy output (the stock init
    repeats one token, which would make equality tests trivially true)."""
    import torch

    model = load_model(ModelSpec(source="tiny"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3, generator=g)
    return model


PROMPTS = ["Hello there, how are you?", "x", "The grass is green. The sky is blue. The sun"]


# --------------------------------------------------------------------------- generate


def test_batched_greedy_equals_unbatched_and_no_cache_recomputation(lively):
    import torch

    from longrecipe.evaluate.generate import greedy

    tok = byte_tokenizer()
    enc = [tok(p)["input_ids"] for p in PROMPTS]
    batched = greedy(lively, enc, 12, pad_id=tok.pad_token_id)
    alone = [greedy(lively, [e], 12, pad_id=tok.pad_token_id)[0] for e in enc]
    assert batched == alone
    assert len({tuple(ids) for ids, _ in batched}) == 3 and len(set(batched[0][0])) > 3
    for e, (ids, why) in zip(enc, batched, strict=True):
        assert why == "length" and len(ids) == 12
        seq = list(e)
        for _ in range(6):  # full recomputation, no cache, explicit mask and positions
            x = torch.tensor([seq])
            with torch.no_grad():
                logits = lively(input_ids=x, attention_mask=torch.ones_like(x),
                                position_ids=torch.arange(len(seq))[None]).logits
            seq.append(int(logits[0, -1].argmax()))
        assert seq[len(e):] == ids[:6]


def test_generate_keeps_order_across_batch_sizes(lively):
    from longrecipe.evaluate.generate import generate

    tok = byte_tokenizer()
    one = generate(lively, tok, PROMPTS, 8, stop_at_newline=False, batch_size=1)
    two = generate(lively, tok, PROMPTS, 8, stop_at_newline=False, batch_size=2)
    assert [g.token_ids for g in one] == [g.token_ids for g in two]
    assert [g.n_input_tokens for g in one] == [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert all(g.text == tok.decode(g.token_ids, skip_special_tokens=True) for g in one)


def test_stop_rule_newline_only_after_text_and_eos():
    from longrecipe.evaluate.generate import StopRule

    tok = byte_tokenizer()
    nl, sp, a = tok.convert_tokens_to_ids(["Ċ", "Ġ", "a"])
    rule = StopRule(tok, {tok.eos_token_id}, newline=True)
    assert rule.check(nl, False) == (None, False)  # a leading line break does not stop
    assert rule.check(sp, False) == (None, False)
    assert rule.check(a, False) == (None, True)
    assert rule.check(nl, True) == ("newline", True)
    assert rule.check(tok.eos_token_id, False)[0] == "eos"
    assert StopRule(tok, set(), newline=False).check(nl, True) == (None, True)


# --------------------------------------------------------------------------- perplexity


def test_mean_nll_matches_the_models_own_loss(lively):
    import torch

    from longrecipe.evaluate.perplexity import mean_nll, windows

    ids = byte_tokenizer()("The grass is green. The sky is blue.")["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        loss = lively(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss.item()
    ours = mean_nll(lively, [ids, ids], chunk=7)  # chunks that do not divide the length
    assert ours[0] == pytest.approx(loss, rel=1e-5) and ours[1] == pytest.approx(ours[0])
    assert windows([[1, 2, 3], [1, 2, 3, 4, 5]], 4) == [(1, [1, 2, 3, 4])]


# --------------------------------------------------------------------------- the stage


@pytest.fixture
def docs(tmp_path, store, tiny_spec):
    from longrecipe import run_ingest

    corpus = write_corpus(tmp_path, n_docs=10, sentences=60)
    cfg = IngestConfig(sources=[SourceSpec(path=str(corpus))], shard_size=4, heldout_fraction=0.4)
    return run_ingest(cfg, tiny_spec, store, QUIET)


def _cfg(**kw) -> EvaluateConfig:
    base = dict(suites=["niah", "perplexity", "retention"], lengths=[512, 1024], depths=3,
                niah_max_new_tokens=8, retention_length=64, max_documents=2, haystack="noise")
    base.update(kw)
    return EvaluateConfig(**base)


def _models(tiny_spec):
    return {"base": tiny_spec, "merged": ModelSpec(source="tiny", tiny=tiny_spec.tiny.model_copy(update={"seed": 1}))}


def _comparable(ref):
    t = ref.read_table("eval_results")
    return t.drop_columns(["seconds"]).to_pylist()


def test_stage_end_to_end_writes_results_summary_and_heatmaps(store, docs, tiny_spec):
    ref = run_evaluate(_cfg(), _models(tiny_spec), store, QUIET, documents=docs)
    res = ref.read_table("eval_results")
    # 2 models x (niah 2 lengths x 3 depths + perplexity + retention)
    niah = res.filter(pc.equal(res.column("suite"), "niah"))
    assert niah.num_rows == 2 * 2 * 3
    assert set(niah.column("depth").to_pylist()) == {0.0, 50.0, 100.0}
    for r in niah.to_pylist():
        assert r["score"] in (0.0, 100.0) and r["metric"] == "all"
        assert r["references"][0] in r["prompt"]
        assert r["n_input_tokens"] + 8 <= r["length"]
    ppl = res.filter(pc.is_in(res.column("suite"), pc.cast(["perplexity", "retention"], "string")))
    assert ppl.num_rows > 0
    for r in ppl.to_pylist():
        assert r["score"] is None and r["value"] > 1 and r["doc_id"]
        assert r["n_input_tokens"] == (64 if r["suite"] == "retention" else r["length"])
    # the same held-out documents give base and merged the same windows
    ret = [r for r in ppl.to_pylist() if r["suite"] == "retention"]
    assert {r["doc_id"] for r in ret if r["model"] == "base"} == {
        r["doc_id"] for r in ret if r["model"] == "merged"}
    summary = ref.read_table("eval_summary").to_pylist()
    base_niah = [s for s in summary if s["model"] == "base" and s["suite"] == "niah"]
    assert [s["length"] for s in base_niah] == [512, 1024] and all(s["n"] == 3 for s in base_niah)
    ret_sum = next(s for s in summary if s["model"] == "base" and s["suite"] == "retention")
    vals = [r["value"] for r in ret if r["model"] == "base"]
    assert ret_sum["perplexity"] == pytest.approx(math.exp(sum(map(math.log, vals)) / len(vals)))
    for label in ("base", "merged"):
        png = ref.path / "files" / f"heatmap-{label}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert any(f["path"] == f"files/heatmap-{label}.png" for f in ref.manifest["files"])
    assert ref.info["models"]["base"] == resolve(tiny_spec).key
    # a second call is a cache hit
    assert run_evaluate(_cfg(), _models(tiny_spec), store, QUIET, documents=docs).key == ref.key


def test_interrupted_run_resumes_without_recomputing(store, docs, tiny_spec, tmp_path, monkeypatch):
    cfg = _cfg(suites=["niah", "retention"])
    calls = []
    real = suites_mod.SuiteRunner.run

    def crashing(self, part):
        if len(calls) == 3:
            raise RuntimeError("killed")
        calls.append(part.index)
        return real(self, part)

    monkeypatch.setattr(suites_mod.SuiteRunner, "run", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        run_evaluate(cfg, _models(tiny_spec), store, QUIET, documents=docs)
    assert store.get("evaluate", evaluate_spec(cfg, {k: resolve(v) for k, v in _models(tiny_spec).items()}, docs).key) is None

    def counting(self, part):
        calls.append(part.index)
        return real(self, part)

    monkeypatch.setattr(suites_mod.SuiteRunner, "run", counting)
    ref = run_evaluate(cfg, _models(tiny_spec), store, QUIET, documents=docs)
    n_parts = 2 * (2 + 1)
    assert sorted(calls) == list(range(n_parts))  # each part computed exactly once overall
    assert ref.manifest["timings"]["resumed_parts"] == 3

    fresh = run_evaluate(cfg, _models(tiny_spec), ArtifactStore(tmp_path / "fresh"), QUIET,
                         documents=_same_docs(docs, tmp_path))
    assert _comparable(fresh) == _comparable(ref)


def _same_docs(docs, tmp_path):
    """The same documents artifact in another store (copied, so the key is equal)."""
    import shutil

    target = tmp_path / "fresh" / "ingest" / docs.key
    shutil.copytree(docs.path, target)
    return ArtifactStore(tmp_path / "fresh").require("ingest", docs.key)


def test_ruler_suite_with_a_fake_generator(store, tiny_spec, monkeypatch):
    from longrecipe.evaluate import ruler

    seen = []

    def fake(task, length, tokenizer, n, seed, data_dir, prompt_format="base"):
        seen.append((task, length, n, seed))
        return [
            ruler.RulerSample(task=task, index=i, input=f"Say {i}. Answer:", references=["zz", str(i)],
                              max_new_tokens=4 + i % 2, metric="part" if task == "qa_1" else "all",
                              n_input_tokens=0)
            for i in range(n)
        ]

    monkeypatch.setattr(ruler, "generate_samples", fake)
    cfg = EvaluateConfig(suites=["ruler"], lengths=[64], ruler_tasks=["qa_1", "vt"], samples=3)
    ref = run_evaluate(cfg, {"base": tiny_spec}, store, QUIET, data_dir=RULER_DATA)
    # one sample per task first (the length check before models load), then the real run
    assert seen == [("qa_1", 64, 1, 42), ("vt", 64, 1, 42), ("qa_1", 64, 3, 42), ("vt", 64, 3, 42)]
    rows = ref.read_table("eval_results").to_pylist()
    assert [(r["task"], r["index"]) for r in rows] == [("qa_1", i) for i in range(3)] + [("vt", i) for i in range(3)]
    for r in rows:
        assert r["n_output_tokens"] <= 4 + r["index"] % 2
        assert r["metric"] == ("part" if r["task"] == "qa_1" else "all")
    summary = {(s["task"], s["length"]): s for s in ref.read_table("eval_summary").to_pylist()}
    assert summary[("mean", 64)]["score"] == pytest.approx(
        (summary[("qa_1", 64)]["score"] + summary[("vt", 64)]["score"]) / 2)


@pytest.mark.integration
@pytest.mark.skipif(not HAS_RULER, reason="RULER data not fetched (longrecipe data fetch ruler)")
def test_all_13_ruler_tasks_and_essay_niah_run_on_the_tiny_model(store, tiny_spec):
    from longrecipe.evaluate.ruler import RULER_TASKS

    # 8192: every task's smallest prompt fits with the byte-level tokenizer (cwe needs it)
    cfg = EvaluateConfig(suites=["niah", "ruler"], lengths=[8192], depths=2, haystack="essay",
                         samples=1, niah_max_new_tokens=8)
    ref = run_evaluate(cfg, {"base": tiny_spec}, store, QUIET, data_dir=RULER_DATA)
    rows = ref.read_table("eval_results").to_pylist()
    assert sorted(r["task"] for r in rows) == sorted(["niah", "niah", *RULER_TASKS])
    for r in rows:
        assert 0 <= r["score"] <= 100 and r["references"]
        assert r["n_input_tokens"] + r["n_output_tokens"] <= 8192
        assert r["metric"] == ("part" if r["task"].startswith("qa_") else "all")
    summary = {s["task"]: s for s in ref.read_table("eval_summary").to_pylist()}
    assert summary["mean"]["n"] == 13
    assert {f"data:{f}" for f in ("PaulGrahamEssays.json", "squad.json", "hotpotqa.json")} <= set(
        ref.manifest["inputs"])
    assert (ref.path / "files" / "heatmap-base.png").exists()


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_named(store, docs, tiny_spec, tmp_path, monkeypatch):
    with pytest.raises(EvaluateError, match="need the ingest artifact"):
        run_evaluate(_cfg(), {"base": tiny_spec}, store, QUIET)
    with pytest.raises(EvaluateError, match="longrecipe data fetch ruler"):
        run_evaluate(_cfg(suites=["niah"], haystack="essay"), {"base": tiny_spec}, store, QUIET,
                     data_dir=tmp_path)
    with pytest.raises(EvaluateError, match="label"):
        run_evaluate(_cfg(suites=["niah"]), {"a/b": tiny_spec}, store, QUIET)
    monkeypatch.setattr(suites_mod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(EvaluateError, match=r"evaluate.lengths: 256 is too short.*at least 4"):
        run_evaluate(_cfg(suites=["niah"], lengths=[256]), {"base": tiny_spec}, store, QUIET)


@pytest.mark.skipif(not HAS_RULER, reason="RULER data not fetched (longrecipe data fetch ruler)")
def test_ruler_length_too_short_fails_before_any_model_loads(store, tiny_spec, monkeypatch):
    monkeypatch.setattr(suites_mod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = EvaluateConfig(suites=["ruler"], lengths=[300, 4096], ruler_tasks=["niah_single_1", "vt"])
    with pytest.raises(EvaluateError, match=r"300 is too short for RULER task niah_single_1.*task vt"):
        run_evaluate(cfg, {"base": tiny_spec}, store, QUIET, data_dir=RULER_DATA)


def test_documents_without_heldout_split_are_refused(tmp_path, store, tiny_spec):
    from longrecipe import run_ingest

    corpus = write_corpus(tmp_path, n_docs=3)
    no_heldout = run_ingest(IngestConfig(sources=[SourceSpec(path=str(corpus))]), tiny_spec, store, QUIET)
    with pytest.raises(EvaluateError, match="heldout_fraction"):
        run_evaluate(_cfg(suites=["retention"]), {"base": tiny_spec}, store, QUIET, documents=no_heldout)


# --------------------------------------------------------------------------- demo model


@pytest.mark.slow
@pytest.mark.skipif(not DEMO_GGUF.exists(), reason="demo model not fetched (longrecipe data fetch demo)")
def test_demo_model_finds_a_needle_in_a_1000_token_haystack():
    from longrecipe.evaluate.generate import generate
    from longrecipe.evaluate.metrics import string_match_all
    from longrecipe.evaluate.niah import depth_grid, niah_samples, noise_haystack
    from longrecipe.models import load_tokenizer

    spec = ModelSpec(source=str(DEMO_GGUF))
    tok, model = load_tokenizer(spec), load_model(spec)
    samples = niah_samples(1100, depth_grid(10), tok, noise_haystack(), max_new_tokens=16)
    # RULER's fitter: the prompt fills the budget to within one noise line (~20 tokens)
    line = len(tok(noise_haystack().text + "\n", add_special_tokens=False)["input_ids"])
    assert all(1100 - 16 - line <= s.n_input_tokens <= 1100 - 16 for s in samples)
    gens = generate(model, tok, [s.prompt for s in samples], 16, stop_at_newline=True)
    found = sum(string_match_all(g.text, s.references) == 100 for s, g in zip(samples, gens, strict=True))
    print(f"demo model NIAH 1k noise: found {found}/10")
    assert found >= 7, [g.text for g in gens]
