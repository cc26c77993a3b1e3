"""Every model family the tiny preset builds (Llama, Mistral, Qwen2, Qwen3, Phi-3 with
partial rotary, Gemma-2 with soft-capping) through the whole pipeline on CPU:
ingest -> analyze -> build -> train -> anneal -> merge -> evaluate, by library calls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from longrecipe import (
    AnalyzeConfig,
    AnnealConfig,
    BuildConfig,
    EvaluateConfig,
    IngestConfig,
    MergeConfig,
    ModelSpec,
    OptimConfig,
    PipelineConfig,
    RopeConfig,
    SourceSpec,
    TinyModelConfig,
    TrainConfig,
    load_model,
    replay_build_config,
    run_analyze,
    run_anneal,
    run_build,
    run_evaluate,
    run_ingest,
    run_merge,
    run_train,
)
from longrecipe.synthetic import write_filler_corpus
from tests.conftest import QUIET

pytestmark = pytest.mark.integration

# family -> (head tied to the embeddings, the tokenizer adds BOS) as in released checkpoints
FAMILIES = {
    "llama": (True, True), "mistral": (False, True), "qwen2": (True, False),
    "qwen3": (True, False), "phi3": (False, True), "gemma2": (True, True),
}
TARGET = 512


def recipe(family: str, corpus: str) -> PipelineConfig:
    tied, bos = FAMILIES[family]
    tiny = TinyModelConfig(family=family, add_bos=bos, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128)
    one_step = OptimConfig(max_steps=1, lr=1e-3, precision="fp32")
    return PipelineConfig(
        model=ModelSpec(tiny=tiny),
        ingest=IngestConfig(sources=[SourceSpec(path=corpus)], heldout_fraction=0.3),
        analyze=AnalyzeConfig(method="logit_delta", reference_rope=RopeConfig(theta=80000.0),
                              max_context=TARGET, shard_docs=4, max_documents=3),
        build=BuildConfig(train_len=96, target_len=TARGET, num_samples=2),
        train=TrainConfig(optim=one_step, rope=RopeConfig(theta=40000.0)),
        anneal=AnnealConfig(optim=OptimConfig(max_steps=1, lr=1e-4, schedule="linear",
                                              precision="fp32"), train_len=64),
        merge=MergeConfig(weight=0.5),
        evaluate=EvaluateConfig(suites=["niah", "perplexity"], lengths=[TARGET], depths=1,
                                niah_max_new_tokens=4, max_documents=1),
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(write_filler_corpus(tmp_path_factory.mktemp("c") / "c.jsonl", n_docs=8,
                                   sentences=30))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_the_pipeline_and_keeps_its_head_and_rope(family, corpus, store):
    cfg = recipe(family, corpus)
    tied, bos = FAMILIES[family]
    docs = run_ingest(cfg.ingest, cfg.model, store, QUIET)
    assert docs.info["special_tokens"]["adds_bos"] is bos
    first = docs.read_table("documents").column("input_ids")[0].as_py()
    assert (first[0] == 256) is bos
    analysis = run_analyze(cfg.analyze, docs, cfg.model, store, QUIET)
    score = np.array(analysis.read_table("token_scores").column("score")[0].as_py(), float)
    assert np.isfinite(score[1:]).all() and np.abs(score[1:]).max() > 0
    assert analysis.info["sentences_flagged_fraction"] < 0.9
    samples = run_build(cfg.build, docs, analysis, store, QUIET)
    trained = run_train(cfg.train, samples, cfg.model, store, QUIET)
    replay = run_build(replay_build_config(cfg), docs, None, store, QUIET)
    annealed = run_anneal(cfg.anneal, trained, replay, store, QUIET)
    merged = run_merge(cfg.merge, cfg.model, annealed, store, QUIET)
    result = run_evaluate(cfg.evaluate, {"base": cfg.model, "merged": merged}, store, QUIET,
                          documents=docs)

    # The merged folder: the family's architecture, head tying and RoPE settings.
    folder = merged.path / "files" / "model"
    conf = json.loads((folder / "config.json").read_text())
    base = load_model(cfg.model)
    assert conf["model_type"] == base.config.model_type
    assert conf["tie_word_embeddings"] is tied
    assert conf["max_position_embeddings"] == TARGET
    rope = conf["rope_parameters"]
    assert rope["rope_theta"] == 40000.0 and rope["rope_type"] == "default"
    if family == "phi3":
        assert rope["partial_rotary_factor"] == 0.5  # half of each head rotates, still
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) is not tied
    model = load_model(merged)
    if family == "gemma2":
        assert model.config._attn_implementation == "eager"  # no sdpa path in Gemma-2
        assert model.config.final_logit_softcapping == 30.0
    # The merged weights are the average of the original and the annealed ones.
    ann = load_model(annealed)
    for (name, p), q, b in zip(model.named_parameters(), ann.parameters(), base.parameters(),
                               strict=True):
        torch.testing.assert_close(p, 0.5 * b + 0.5 * q, msg=name)
    rows = result.read_table("eval_results").to_pylist()
    assert {(r["model"], r["suite"]) for r in rows} == {
        (m, s) for m in ("base", "merged") for s in ("niah", "perplexity")}
    assert all(r["value"] > 1 for r in rows if r["suite"] == "perplexity")
    assert result.info["special_tokens"]["merged"]["adds_bos"] is bos
