"""RoPE as config: applied to a loaded model, saved, reloaded, frequencies checked."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from longrecipe import ModelSpec, RopeConfig
from longrecipe.models import load_model
from longrecipe.rope import RopeError, apply_rope, inv_freq

BASE_WINDOW = 256  # the tiny preset's max_position_embeddings
HEAD_DIM = 16  # hidden 64 / 4 heads


def default_freqs(theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)


def llama3_freqs(theta, factor, low, high, original) -> torch.Tensor:
    """Llama 3.1's rule, written out: long wavelengths divided by factor, short ones kept,
    a smooth blend between."""
    out = []
    for f in default_freqs(theta).tolist():
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(f)
        elif wavelen > original / low:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out)


@pytest.fixture
def model():
    return load_model(ModelSpec())


def roundtrip(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "m")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_theta_round_trips_and_changes_the_logits(model, tmp_path):
    ids = torch.arange(1, 40)[None]
    pos = torch.arange(0, 390, 10)[None]
    with torch.no_grad():
        before = model(input_ids=ids, position_ids=pos).logits
    params = apply_rope(model, RopeConfig(theta=500000.0), 1024)
    assert params == {"rope_type": "default", "rope_theta": 500000.0}
    assert torch.allclose(inv_freq(model), default_freqs(500000.0))
    with torch.no_grad():
        after = model(input_ids=ids, position_ids=pos).logits
    assert not torch.allclose(before, after)  # the live model really uses the new RoPE
    loaded = roundtrip(model, tmp_path)
    assert loaded.config.max_position_embeddings == 1024
    assert loaded.config.rope_parameters["rope_theta"] == 500000.0
    assert torch.equal(inv_freq(loaded), inv_freq(model))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, position_ids=pos).logits, after)


def test_linear_divides_every_frequency(model, tmp_path):
    apply_rope(model, RopeConfig(type="linear"), 1024)  # factor derived: 1024 / 256
    loaded = roundtrip(model, tmp_path)
    assert loaded.config.rope_parameters["factor"] == 4.0
    assert torch.allclose(inv_freq(loaded), default_freqs(10000.0) / 4)


def test_yarn_matches_transformers_and_scales_attention(model, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    apply_rope(model, RopeConfig(type="yarn", factor=8.0, theta=20000.0), 2048)
    loaded = roundtrip(model, tmp_path)
    p = loaded.config.rope_parameters
    assert p["rope_type"] == "yarn" and p["factor"] == 8.0
    assert p["original_max_position_embeddings"] == BASE_WINDOW
    want, scaling = ROPE_INIT_FUNCTIONS["yarn"](loaded.config)
    assert torch.equal(inv_freq(loaded), want)
    assert loaded.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(8) + 1)
    base = default_freqs(20000.0)
    got = inv_freq(loaded)
    assert torch.allclose(got[0], base[0]) and torch.allclose(got[-1], base[-1] / 8)


def test_llama3_matches_its_rule(model, tmp_path):
    cfg = RopeConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)
    apply_rope(model, cfg, 1024)
    loaded = roundtrip(model, tmp_path)
    assert loaded.config.rope_parameters["original_max_position_embeddings"] == 64
    assert torch.allclose(inv_freq(loaded), llama3_freqs(10000.0, 8.0, 1.0, 4.0, 64))


def test_config_change_alone_does_nothing_without_rebuilding(model):
    """Why apply_rope rebuilds the rotary modules: transformers bakes inv_freq at build."""
    before = inv_freq(model).clone()
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    assert torch.equal(inv_freq(model), before)


def test_dynamic_is_refused_for_training_only(model):
    with pytest.raises(RopeError, match="batch order"):
        apply_rope(model, RopeConfig(type="dynamic", factor=4.0), 1024)
    params = apply_rope(model, RopeConfig(type="dynamic", factor=4.0), 1024, training=False)
    assert params["rope_type"] == "dynamic"
    # a model that already carries dynamic RoPE is refused too
    with pytest.raises(RopeError, match="dynamic"):
        apply_rope(model, None, 1024)


def test_bad_rope_configs_fail_clearly(model):
    with pytest.raises(ValidationError, match="rope.factor is only used"):
        RopeConfig(factor=2.0)
    with pytest.raises(ValidationError):
        RopeConfig(type="linear", factor=0.5)
    with pytest.raises(RopeError, match="below 1"):
        apply_rope(model, RopeConfig(type="linear"), 128)  # would shrink the window


def test_no_change_keeps_rope_and_sets_the_window(model):
    before = inv_freq(model).clone()
    params = apply_rope(model, None, 4096)
    assert params == {"rope_type": "default", "rope_theta": 10000.0}
    assert model.config.max_position_embeddings == 4096
    assert torch.equal(inv_freq(model), before)


# --------------------------------------------------------------------------- keys kept


def test_partial_rotary_factor_kept():
    """Phi-3 style models rotate part of each head: a new theta must not change that (the
    old apply_rope rebuilt rope_parameters and dropped partial_rotary_factor, silently
    rotating the whole head)."""
    from longrecipe import TinyModelConfig

    phi = load_model(ModelSpec(tiny=TinyModelConfig(family="phi3")))
    rotary_dims = inv_freq(phi).numel()
    params = apply_rope(phi, RopeConfig(theta=160000.0), 1024)
    assert params == {"rope_type": "default", "rope_theta": 160000.0, "partial_rotary_factor": 0.5}
    assert phi.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert inv_freq(phi).numel() == rotary_dims == HEAD_DIM // 4  # half of 16 dims, in pairs
    yarn = apply_rope(phi, RopeConfig(type="default", theta=2e5), 2048)
    assert yarn["partial_rotary_factor"] == 0.5


def test_an_existing_scaling_is_never_dropped_silently(model):
    """Llama-3.1 ships llama3 RoPE: `default` with a new theta used to strip it."""
    llama31 = RopeConfig(type="llama3", factor=8.0, original_max_position_embeddings=64,
                         low_freq_factor=1.0, high_freq_factor=4.0)
    apply_rope(model, llama31, 512, training=False)
    with pytest.raises(RopeError, match="would drop the model's 'llama3' RoPE scaling"):
        apply_rope(model, RopeConfig(theta=5e5), 1024)
    assert model.config.rope_parameters["rope_type"] == "llama3"  # untouched on refusal
    # Same type, new theta: factor, bands and original window are the model's own.
    kept = apply_rope(model, RopeConfig(type="llama3", theta=5e5), 1024)
    assert kept == {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                    "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0}
    assert torch.allclose(inv_freq(model), llama3_freqs(5e5, 8.0, 1.0, 4.0, 64))
    # Replacing it must be said explicitly; the scaling keys go, the others stay.
    model.config.rope_parameters["partial_rotary_factor"] = 1.0
    plain = apply_rope(model, RopeConfig(theta=5e5, replace_scaling=True), 1024)
    assert plain == {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 1.0}
    yarn = apply_rope(model, RopeConfig(type="yarn", factor=4.0, replace_scaling=True), 1024)
    assert yarn["original_max_position_embeddings"] == 1024 and "low_freq_factor" not in yarn
