"""What only a CUDA device can show: bf16 training on the GPU, the attention-mask rule
under CUDA kernels, decoding that agrees with the CPU, and flash-attention when the
package is there. Every test is marked `gpu` and skipped without CUDA (conftest.py).

    pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longrecipe import ModelSpec, OptimConfig, RuntimeConfig, TrainConfig, run_train
from longrecipe.loop import causal_lm_forward
from longrecipe.models import load_model, load_tokenizer
from tests.test_train import make_samples, metrics, positions

pytestmark = pytest.mark.gpu

CUDA = RuntimeConfig(progress=False, device="cuda")


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def test_bf16_training_on_cuda_learns_and_saves_fp32_weights(store):
    samples = make_samples(store, n_samples=8)
    cfg = TrainConfig(optim=OptimConfig(lr=3e-3, max_steps=12, batch_size=2, precision="bf16"))
    ref = run_train(cfg, samples, ModelSpec(), store, CUDA)
    losses = [r["loss"] for r in metrics(ref)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
    assert ref.info["device"].startswith("cuda")
    from safetensors import safe_open

    with safe_open(str(ref.path / "files/model/model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


@pytest.mark.parametrize("attention", ["sdpa", "eager"] + (["flash_attention_2"] if _has_flash_attn() else []))
@pytest.mark.parametrize("method", ["randomized", "pose", "longrecipe"])
def test_gapped_positions_still_see_the_first_token_on_cuda(attention, method):
    """The trap of docs/training.md under CUDA kernels: with position ids that have gaps,
    the loop's explicit mask keeps full causal attention (the last logits move when the
    first token changes)."""
    dtype = torch.bfloat16 if attention == "flash_attention_2" else torch.float32
    model = load_model(ModelSpec(), attention=attention, device="cuda").to(dtype)
    n = 128
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1)).cuda()
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 256
    pos = torch.from_numpy(positions(method, n))[None].cuda()
    with torch.no_grad():
        a = causal_lm_forward(model, ids, pos).logits[0, -1].float()
        b = causal_lm_forward(model, other, pos).logits[0, -1].float()
    assert (a - b).abs().max() > 1e-4


def test_cuda_decoding_matches_cpu_decoding():
    from longrecipe.evaluate.generate import generate

    tok = load_tokenizer(ModelSpec())
    prompts = ["The cat sat on the", "Ledger 3 of Ada, code 4411. Ada keeps", "Numbers: 1 2 3"]
    outs = {}
    for device in ("cpu", "cuda"):
        model = load_model(ModelSpec(), attention="eager", device=device)
        outs[device] = [g.text for g in generate(model, tok, prompts, 16, stop_at_newline=False,
                                                 batch_size=2)]
    assert outs["cpu"] == outs["cuda"]


@pytest.mark.skipif(not _has_flash_attn(), reason="needs the flash-attn package")
def test_auto_attention_picks_flash_attention_on_cuda():
    from longrecipe.models import pick_attention

    assert pick_attention("auto", "cuda") == "flash_attention_2"


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_the_loop_trains_with_torch_attention_kernels_on_cuda(store, attention):
    """The loop's padded layout (explicit mask) under sdpa and flex_attention, bf16, on
    LongRecipe position ids: the backend is resolved for CUDA and recorded."""
    samples = make_samples(store, n_samples=4)
    cfg = TrainConfig(optim=OptimConfig(lr=3e-3, max_steps=6, batch_size=2, attention=attention))
    ref = run_train(cfg, samples, ModelSpec(), store, CUDA)
    losses = [r["loss"] for r in metrics(ref)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert ref.info["attention"] == attention


def test_stages_place_their_models_on_an_indexed_gpu(documents, store, tiny_spec):
    """`cuda:N` end to end: analysis, training and evaluation on the last visible GPU (the
    device a branch of the concurrent comparison gets)."""
    from longrecipe import AnalyzeConfig, EvaluateConfig, run_analyze, run_evaluate

    device = f"cuda:{torch.cuda.device_count() - 1}"
    rt = RuntimeConfig(progress=False, device=device)
    analysis = run_analyze(AnalyzeConfig(method="lsd", max_context=512, short_window=64,
                                         short_stride=32, max_documents=2),
                           documents, tiny_spec, store, rt)
    assert analysis.info["tokens_scored"] > 0
    trained = run_train(TrainConfig(optim=OptimConfig(max_steps=2, precision="bf16")),
                        make_samples(store, n_samples=4), ModelSpec(), store, rt)
    assert trained.info["device"].startswith("cuda") and trained.info["steps"] == 2
    ev = run_evaluate(EvaluateConfig(suites=["perplexity"], lengths=[128], max_documents=1),
                      {"base": tiny_spec}, store, rt, documents=documents)
    assert ev.read_table("eval_summary").num_rows == 1
