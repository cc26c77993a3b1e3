"""The chunked training loss: equal to the model's own loss and its gradients, and never
a [tokens, vocab] logits tensor for the whole sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import longrecipe.loop as loop_mod
from longrecipe import ModelSpec, OptimConfig, TinyModelConfig, TrainConfig
from longrecipe.batches import Sample, collate
from longrecipe.head import forward_hidden, output_head
from longrecipe.loss import chunked_nll_sum, full_nll_sum
from longrecipe.models import load_model
from longrecipe.train import run_train
from tests.conftest import QUIET
from tests.test_train import make_samples, positions

SPEC = ModelSpec(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _samples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Sample(i, rng.integers(0, 256, n), positions("longrecipe", n, seed=i))
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_equals_the_model_loss_and_its_gradients(chunk):
    """fp32, two samples of unequal length (padding), LongRecipe position ids: the chunked
    sum over label tokens equals transformers' own loss x tokens, and every parameter's
    gradient is within 1e-5 of it (relative, in norm)."""
    model = load_model(SPEC, attention="sdpa").train()
    b = collate(_samples([50, 33]), pad_id=0, device="cpu")
    labels = torch.where(b.attention_mask.bool(), b.input_ids, torch.full_like(b.input_ids, -100))
    ref = model(input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=b.attention_mask,
                labels=labels, use_cache=False).loss * b.n_labels
    ref.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    hidden = forward_hidden(model, b.input_ids, b.position_ids, b.attention_mask)
    got = chunked_nll_sum(hidden, b.targets, output_head(model), chunk)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    grads = _grads(model)
    assert grads.keys() == want.keys()
    for name, g in grads.items():  # relative error of each gradient tensor (norm)
        assert (g - want[name]).norm() <= 1e-5 * want[name].norm(), name


def test_full_and_chunked_sums_agree():
    model = load_model(SPEC, attention="sdpa")
    b = collate(_samples([40]), pad_id=0, device="cpu")
    with torch.no_grad():
        h = forward_hidden(model, b.input_ids, b.position_ids, b.attention_mask)
        head = output_head(model)
        assert chunked_nll_sum(h, b.targets, head, 5).item() == pytest.approx(
            full_nll_sum(h, b.targets, head).item(), rel=1e-6)


def test_training_loss_never_materialises_full_logits(store, monkeypatch):
    """Finding: the loss was computed from full logits ([tokens, vocab] for the whole
    sequence). With loss_chunk_tokens=16 the output head never sees more than 16 rows,
    in forward or in the backward recomputation."""
    rows = []
    real = loop_mod.load_model

    def spy(*args, **kwargs):
        m = real(*args, **kwargs)
        m.lm_head.register_forward_hook(
            lambda mod, inp, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0]) if m.training else None
        )
        return m

    monkeypatch.setattr(loop_mod, "load_model", spy)
    samples = make_samples(store, n_samples=2, length=96)
    cfg = TrainConfig(optim=OptimConfig(max_steps=2, precision="fp32", loss_chunk_tokens=16))
    run_train(cfg, samples, ModelSpec(), store, QUIET)
    assert rows and max(rows) <= 16  # 96-token samples: six chunks, none of them whole
    assert sum(1 for r in rows if r == 16) >= 12  # two steps, forward and recomputation
