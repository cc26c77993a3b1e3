"""The attention backend: resolved once for the device the model trains on, and given
sequence boundaries explicitly (padded rows with a mask, or packed rows with
cu_seq_lens for flash attention's varlen kernel).

flash-attn cannot be installed on this machine (no CUDA), so the flash path is checked
with stand-ins: a stub `flash_attn` package for the resolution and loading path, and a
registered varlen attention function, which computes causal attention per segment from
`cu_seq_lens_q` exactly as flash_attn_varlen_func does, for the packed layout.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import longrecipe.loop as loop_mod
from longrecipe import ModelSpec, OptimConfig, StageSpec
from longrecipe.batches import Sample, collate
from longrecipe.distributed import make_accelerator
from longrecipe.loop import fit, load_for_training
from longrecipe.model_io import as_source
from longrecipe.models import ModelError, load_model, pick_attention
from tests.conftest import QUIET
from tests.test_train import positions


@pytest.fixture
def flash_attn_installed(monkeypatch):
    """`importlib.util.find_spec("flash_attn")` finds a (stub) package."""
    stub = types.ModuleType("flash_attn")
    stub.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn", stub)


def test_flash_attention_resolved_for_cuda_is_not_rechecked_on_the_cpu_load(flash_attn_installed, monkeypatch):
    """Finding: with flash-attn on a CUDA machine every train and anneal failed: the stage
    resolved flash_attention_2 for the CUDA device, then `load_model(device="cpu")`
    re-checked it against the CPU and raised. The model is loaded on the CPU (accelerate
    moves it) with the backend resolved for CUDA. transformers' own check of the backend
    is replaced by a spy that records what it was asked for: on a machine without CUDA it
    would refuse flash attention."""
    from transformers.modeling_utils import PreTrainedModel

    seen = []

    def spy(self, attn_implementation, *args, **kwargs):
        seen.append(attn_implementation)
        return "sdpa"  # build it runnable here

    monkeypatch.setattr(PreTrainedModel, "_check_and_adjust_attn_implementation", spy)
    attention = pick_attention("auto", "cuda")  # the stage's two calls, as they were
    assert attention == "flash_attention_2"
    model = load_model(ModelSpec(), device="cpu", attention=attention)
    assert seen[0] == "flash_attention_2" and model.device.type == "cpu"

    seen.clear()
    model, attention = load_for_training(as_source(ModelSpec()), "auto", "cuda")
    assert seen[0] == "flash_attention_2"
    # the manifest records what the model really runs (here the spy built it with sdpa)
    assert attention == model.config._attn_implementation == "sdpa"
    # asked for by name on a device that cannot run it, it is still refused up front
    with pytest.raises(ModelError, match="needs CUDA"):
        load_for_training(as_source(ModelSpec()), "flash_attention_2", "cpu")
    with pytest.raises(ModelError, match="CUDA only"):
        pick_attention("flex_attention", "cpu")


# --------------------------------------------------------------------------- explicit boundaries


CALLS: list[list[int]] = []


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention inside each [cu[i], cu[i+1]) segment of a packed row, the contract
    of flash_attn_varlen_func; in training it refuses to run without explicit boundaries
    (the output head's probe, in eval mode, is one plain sequence)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and not module.training:
        cu = torch.tensor([0, query.shape[2]])
        kwargs = {**kwargs, "cu_seq_lens_q": cu, "max_length_q": query.shape[2]}
    if cu is None or kwargs.get("max_length_q") is None or attention_mask is not None:
        raise AssertionError("packed batches must come with cu_seq_lens and no mask")
    if module.training:
        CALLS.append(cu.tolist())
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    outs = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                           is_causal=True, scale=scaling)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


@pytest.fixture
def varlen_backend(monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("test_varlen", varlen_attention)
    AttentionMaskInterface.register("test_varlen", flash_attention_mask)
    monkeypatch.setattr(loop_mod, "VARLEN_ATTENTION", {"flash_attention_2", "test_varlen"})
    CALLS.clear()
    return "test_varlen"


def _fit(store, samples, attention: str, optim: OptimConfig) -> list[dict]:
    from longrecipe.rope import apply_rope

    model = load_model(ModelSpec(), attention="sdpa")
    apply_rope(model, None, 1024, training=True)  # the samples' positions reach 1023
    model.config._attn_implementation = attention
    out = {}

    def body(w):
        out["metrics"] = fit(model, samples, optim, w, QUIET, make_accelerator(QUIET, optim),
                             attention=attention).metrics

    store.produce(StageSpec("fit", "test_v1", {"attention": attention}, {}), body)
    return out["metrics"]


def _ragged_samples(store, lengths):
    import pyarrow as pa

    rng = np.random.default_rng(3)
    rows = []
    for i, n in enumerate(lengths):
        pos = positions("longrecipe", n, seed=i)
        rows.append({"sample_id": i, "method": "longrecipe", "input_ids": rng.integers(0, 256, n).tolist(),
                     "position_ids": pos.tolist(), "n_tokens": n, "max_position": int(pos.max())})
    spec = StageSpec("build", "test_v1", {"ragged": list(lengths)}, {})
    return store.produce(spec, lambda w: w.write_table("samples", pa.Table.from_pylist(rows)))


def test_varlen_attention_gets_explicit_sequence_boundaries(store, varlen_backend):
    """Finding: under flash_attention_2 transformers drops an all-ones mask and infers
    packed sequences from position ids; gapped ids were one sequence only by that rule.
    Now a flash micro-batch is packed into one row with cu_seq_lens at the samples'
    boundaries: the varlen path gets them explicitly, and trains exactly like the padded
    sdpa path with its explicit mask (fp32)."""
    samples = _ragged_samples(store, [70, 41, 96, 55])
    optim = OptimConfig(lr=1e-3, max_steps=2, batch_size=2, precision="fp32", seed=1)
    padded = _fit(store, samples, "sdpa", optim)
    assert CALLS == []
    packed = _fit(store, samples, varlen_backend, optim)
    assert CALLS, "the varlen backend was never called"
    lengths = {70, 41, 96, 55}
    for cu in CALLS:  # one segment per sample, whatever gaps its position ids have
        assert cu[0] == 0 and len(cu) == 3 and {cu[1], cu[2] - cu[1]} <= lengths
    for a, b in zip(padded, packed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"]


def test_packed_collate_marks_every_boundary():
    rng = np.random.default_rng(0)
    batch = [Sample(i, rng.integers(0, 256, n), positions("pose", n, seed=i)) for i, n in enumerate((9, 5))]
    b = collate(batch, pad_id=0, device="cpu", packed=True)
    assert b.attention_mask is None and b.input_ids.shape == (1, 14)
    assert b.kwargs["cu_seq_lens_q"].tolist() == [0, 9, 14] and b.kwargs["max_length_q"] == 9
    # no target crosses a boundary: the last token of each sample predicts nothing
    assert b.targets[0, 8].item() == -100 and b.targets[0, 13].item() == -100
    assert b.targets[0, :8].tolist() == batch[0].input_ids[1:].tolist()
    assert b.n_labels == 12
    p = collate(batch, pad_id=0, device="cpu")
    assert p.attention_mask.tolist()[1] == [1] * 5 + [0] * 4 and p.n_labels == 12
