"""The model's own output path (longrecipe.head): scaling and soft-capping as the
forward applies them, shared by the analysis log-probs and perplexity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longrecipe.head import forward_hidden, output_head
from longrecipe.logprobs import Window, score_windows
from longrecipe.models import ModelError

SHAPE = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _model(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "cohere":  # logits * logit_scale
        cfg = tf.CohereConfig(**SHAPE, logit_scale=0.37)
        cls = tf.CohereForCausalLM
    elif kind == "granite":  # logits / logits_scaling
        cfg = tf.GraniteConfig(**SHAPE, logits_scaling=3.0)
        cls = tf.GraniteForCausalLM
    elif kind == "gemma2":  # tanh soft-capping
        cfg = tf.Gemma2Config(**SHAPE, head_dim=8, final_logit_softcapping=2.0,
                              attn_logit_softcapping=None)
        cls = tf.Gemma2ForCausalLM
    else:
        cfg = tf.LlamaConfig(**SHAPE)
        cls = tf.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    m = cls(cfg).eval()
    with torch.no_grad():  # random heads give tiny logits; make scaling matter
        m.get_output_embeddings().weight.mul_(20)
    return m


def _own_logprobs(model, ids: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(ids.astype(np.int64))[None]
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
    lp = torch.log_softmax(logits, -1)[:-1].gather(-1, x[0, 1:, None])[:, 0]
    return lp.numpy()


@pytest.mark.parametrize("kind", ["llama", "cohere", "granite", "gemma2"])
def test_logit_scaling_scored_equal_to_own_forward(kind):
    """A model with logit scaling or soft-capping is scored equal to its own forward's
    log-softmax (the old head skipped Cohere's and Granite's scaling)."""
    model = _model(kind)
    ids = np.random.default_rng(0).integers(0, 300, 40).astype(np.int32)
    lp, _ = score_windows(model, [ids], [Window(0, 0, 40, 1)], batch_tokens=64)
    np.testing.assert_allclose(lp[0][1:], _own_logprobs(model, ids), atol=2e-5, rtol=0)


def test_perplexity_uses_the_models_own_output_path():
    from longrecipe.evaluate.perplexity import mean_nll

    model = _model("cohere")
    ids = np.random.default_rng(1).integers(0, 300, 33)
    want = -float(_own_logprobs(model, ids).astype(np.float64).mean())
    assert mean_nll(model, [ids.tolist()], chunk=5)[0] == pytest.approx(want, rel=1e-5)


def test_unknown_output_path_is_refused():
    import transformers as tf

    class Doubled(tf.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2  # a scaling no config field announces
            return out

    cfg = tf.LlamaConfig(**SHAPE)
    model = Doubled(cfg).eval()
    with pytest.raises(ModelError, match="Doubled: its logits are not lm_head"):
        output_head(model)


def test_forward_hidden_is_the_decoders_last_hidden_state():
    model = _model("llama")
    x = torch.randint(0, 300, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        want = model.get_decoder()(input_ids=x, attention_mask=torch.ones_like(x),
                                   position_ids=pos).last_hidden_state
        got = forward_hidden(model, x, pos, torch.ones_like(x))
    torch.testing.assert_close(got, want)


def test_a_forward_without_logits_to_keep_is_refused_clearly():
    import transformers as tf

    class Old(tf.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                    use_cache=None):  # an old-style remote-code signature
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache)

    model = Old(tf.LlamaConfig(**SHAPE)).eval()
    x = torch.randint(0, 300, (1, 5))
    with pytest.raises(ModelError, match="Old: its forward takes no `logits_to_keep`"):
        forward_hidden(model, x, torch.arange(5)[None], torch.ones_like(x))
