"""LongCE-weighted training (train.loss_weights) and the comparison's compute budgets
(compare.flops_of, compare.steps; longrecipe.budget)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longrecipe import (
    AnalyzeConfig,
    BuildConfig,
    OptimConfig,
    TrainConfig,
    load_config,
)
from longrecipe.analyze import run_analyze
from longrecipe.batches import SampleStream, collate
from longrecipe.budget import method_budgets, method_config, step_flops
from longrecipe.build import run_build
from longrecipe.config import LossWeightsConfig
from longrecipe.loss import chunked_nll_sum, full_nll_sum
from longrecipe.model_io import as_source
from longrecipe.model_shape import read_shape
from longrecipe.token_weights import TokenWeights
from longrecipe.train import TrainError, run_train, train_spec
from tests.conftest import QUIET

LSD = AnalyzeConfig(method="lsd", max_context=256, short_window=64, short_stride=16, shard_docs=4)
STEPS = OptimConfig(lr=1e-3, max_steps=2, batch_size=2, precision="fp32")


@pytest.fixture
def lsd_and_samples(documents, store, tiny_spec):
    analysis = run_analyze(LSD, documents, tiny_spec, store, QUIET)
    samples = run_build(BuildConfig(method="full", train_len=128, target_len=256, num_samples=4,
                                    shard_samples=2), documents, None, store, QUIET)
    return analysis, samples


def test_weights_follow_the_spans_and_the_stored_lsd(lsd_and_samples):
    """Each token's weight is min(exp(LSD), cap) of the token its span names; a token
    without a score (the document's first, the EOS after it) weighs 1."""
    analysis, samples = lsd_and_samples
    cap = 2.0
    tw = TokenWeights(analysis, LossWeightsConfig(cap=cap), samples)
    scores = {r["doc_id"]: np.array(r["score"], np.float64)
              for r in analysis.read_table("token_scores", columns=["doc_id", "score"]).to_pylist()}
    row = samples.read_table("samples", columns=["spans", "input_ids"]).to_pylist()[1]
    got = tw.of(row["spans"], len(row["input_ids"]), 1)
    want = []
    for sp in row["spans"]:
        s = scores[sp["doc_id"]]
        for i in range(sp["start"], sp["end"]):
            x = s[i] if i < len(s) else math.nan  # index n_tokens is the EOS
            want.append(1.0 if math.isnan(x) else min(math.exp(x), cap))
    np.testing.assert_allclose(got, np.array(want, np.float32), rtol=1e-6)
    assert got.max() <= cap and (got > 1).any() and (got < 1).any()
    assert 0 < tw.coverage <= 1


def test_weighted_loss_equals_the_reference_sum_and_weights_one_are_plain():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    h = torch.randn(2, 7, 8, requires_grad=True)
    t = torch.randint(0, 11, (2, 7))
    t[1, -2:] = -100
    w = torch.rand(2, 7) * 3
    a = chunked_nll_sum(h, t, head, 3, w)
    b = full_nll_sum(h, t, head, w)
    assert torch.allclose(a, b, atol=1e-5)
    ga, = torch.autograd.grad(a, h)
    gb, = torch.autograd.grad(b, h)
    assert torch.allclose(ga, gb, atol=1e-5)
    ones = chunked_nll_sum(h, t, head, 3, torch.ones(2, 7))
    assert torch.allclose(ones, chunked_nll_sum(h, t, head, 3), atol=1e-5)


def test_collate_aligns_each_weight_with_the_token_it_predicts(lsd_and_samples):
    analysis, samples = lsd_and_samples
    tw = TokenWeights(analysis, LossWeightsConfig(), samples)
    batch = SampleStream(samples, 0, tw).take(0, 2)
    for packed in (False, True):
        b = collate(batch, 0, "cpu", packed=packed)
        w = b.weights.reshape(-1).numpy()
        row0 = batch[0].weights
        assert np.allclose(w[: len(row0) - 1], row0[1:])  # weight of target t is token t + 1's
        assert w[len(row0) - 1] == 0  # the last token predicts nothing
        assert b.weights.shape == b.targets.shape


def test_longce_training_keys_on_the_analysis_and_differs_from_plain(lsd_and_samples, store, tiny_spec):
    analysis, samples = lsd_and_samples
    plain = TrainConfig(optim=STEPS)
    longce = TrainConfig(optim=STEPS, loss_weights=LossWeightsConfig())
    src = as_source(tiny_spec)
    # plain training's key has no trace of the new field (old keys kept)
    assert "loss_weights" not in train_spec(plain, samples, src).config
    spec = train_spec(longce, samples, src, analysis)
    assert spec.inputs["analysis"] == analysis.key
    with pytest.raises(TrainError, match="needs the analysis"):
        train_spec(longce, samples, src)
    a = run_train(plain, samples, tiny_spec, store, QUIET)
    b = run_train(longce, samples, tiny_spec, store, QUIET, analysis=analysis)
    assert a.key != b.key
    la = a.read_table("train_metrics").column("loss").to_pylist()
    lb = b.read_table("train_metrics").column("loss").to_pylist()
    assert la != lb and all(math.isfinite(x) for x in lb)
    assert 0 < b.info["loss_weights_coverage"] <= 1 and b.info["loss_weight_mean"] > 0
    # the same inputs again: the finished artifact
    assert run_train(longce, samples, tiny_spec, store, QUIET, analysis=analysis).key == b.key


def test_longce_refuses_an_analysis_that_is_not_lsd(documents, store, tiny_spec, lsd_and_samples):
    _, samples = lsd_and_samples
    digits = run_analyze(AnalyzeConfig(method="digits"), documents, tiny_spec, store, QUIET)
    with pytest.raises(TrainError, match="needs an lsd analysis"):
        run_train(TrainConfig(optim=STEPS, loss_weights=LossWeightsConfig()), samples, tiny_spec,
                  store, QUIET, analysis=digits)


# --------------------------------------------------------------------------- budgets


def test_equal_flops_gives_full_fewer_steps_and_longrecipe_more():
    base = ["compare.methods=[full, longrecipe]", "train.optim.max_steps=40",
            "build.num_samples=320"]
    cfg = load_config("configs/tiny.yaml", base)
    same = method_budgets(cfg)
    assert {b.steps for b in same.values()} == {40}
    shape = read_shape(cfg.model)
    ratio = (step_flops(shape, cfg.train.optim.global_batch, cfg.build.train_len)
             / step_flops(shape, cfg.train.optim.global_batch, cfg.build.target_len))
    to_lr = method_budgets(load_config("configs/tiny.yaml", base + ["compare.flops_of=longrecipe"]))
    assert to_lr["longrecipe"].steps == 40 and to_lr["full"].steps == max(1, round(40 * ratio))
    assert to_lr["full"].steps < 40
    assert math.isclose(to_lr["full"].flops, to_lr["longrecipe"].flops, rel_tol=0.1)
    assert to_lr["full"].num_samples == math.ceil(320 * to_lr["full"].steps / 40)
    to_full = method_budgets(load_config("configs/tiny.yaml", base + ["compare.flops_of=full"]))
    assert to_full["longrecipe"].steps > 40 and to_full["full"].steps == 40
    by_hand = load_config("configs/tiny.yaml", base + ["compare.steps={full: 7}"])
    b = method_budgets(by_hand)["full"]
    assert b.steps == 7
    mcfg = method_config(by_hand, "full", b)
    assert mcfg.train.optim.max_steps == 7 and mcfg.build.method == "full"
    assert mcfg.build.num_samples == math.ceil(320 * 7 / 40)
    with pytest.raises(Exception, match="not a method"):
        load_config("configs/tiny.yaml", ["compare.steps={fast: 3}"])


def test_equal_steps_leaves_the_recipe_as_it_was():
    cfg = load_config("configs/tiny.yaml")
    for m, b in method_budgets(cfg).items():
        mcfg = method_config(cfg, m, b)
        assert mcfg.train == cfg.train  # same key as before budgets existed
        assert mcfg.build == cfg.build.model_copy(update={"method": m})

