"""The train and anneal stages: the attention-mask trap, learning, resume, schedules,
HF-complete outputs, bad inputs. More than one process: tests/test_launch.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import longrecipe.loop as loop_mod
import longrecipe.train as train_mod
from longrecipe import (
    AnnealConfig,
    ArtifactStore,
    ModelSpec,
    OptimConfig,
    RopeConfig,
    StageSpec,
    TrainConfig,
)
from longrecipe.anneal import run_anneal
from longrecipe.batches import SampleStream
from longrecipe.loop import causal_lm_forward, make_schedule
from longrecipe.model_io import as_source
from longrecipe.models import ModelError, byte_tokenizer, load_model
from longrecipe.rope import RopeError
from longrecipe.train import TrainError, run_train
from tests.conftest import DEMO_GGUF, QUIET

TEXT = b"The cat sat on the mat. The dog sat on the log. " * 64
TARGET = 1024


# --------------------------------------------------------------------------- helpers


def positions(method: str, n: int, target: int = TARGET, seed: int = 0) -> np.ndarray:
    """Position ids of each sampling scheme, made here so the test stands on its own."""
    rng = np.random.default_rng(seed)
    if method == "full":
        return np.arange(n)
    if method == "randomized":
        return np.concatenate([[0], np.sort(rng.choice(np.arange(1, target), n - 1, replace=False))])
    if method == "pose":  # two chunks, the second shifted by one big skip
        cut = n // 3
        skip = target - n
        return np.concatenate([np.arange(cut), np.arange(cut, n) + skip])
    if method == "longrecipe":  # contiguous sentences of 5-9 tokens, random gaps between
        lengths = []
        while sum(lengths) < n:
            lengths.append(int(rng.integers(5, 10)))
        lengths[-1] -= sum(lengths) - n
        m = len(lengths) - 1
        gaps = 1 + rng.multinomial(target - n - m, np.ones(m) / m)  # every gap >= 1
        starts = np.concatenate([[0], np.cumsum(np.array(lengths[:-1]) + gaps)])
        out = np.concatenate([np.arange(s, s + k) for s, k in zip(starts, lengths, strict=True)])
        assert len(out) == n and out[-1] < target and np.all(np.diff(out) > 0)
        return out
    raise ValueError(method)


def make_samples(store: ArtifactStore, method: str = "longrecipe", n_samples: int = 6,
                 length: int = 96, target: int = TARGET, name: str = "s", parts: int = 1):
    """A `samples` artifact in the shape the build stage writes (only the columns used)."""
    ids = np.frombuffer(TEXT, dtype=np.uint8).astype(np.int32)
    rows = []
    for i in range(n_samples):
        pos = positions(method, length, target, seed=i)
        rows.append({
            "sample_id": i, "method": method,
            "input_ids": ids[i * 7 : i * 7 + length].tolist(),
            "position_ids": pos.astype(np.int32).tolist(),
            "n_tokens": length, "max_position": int(pos.max()),
        })

    def body(w):
        per = -(-n_samples // parts)
        for p in range(parts):
            w.write_part("samples", p, pa.Table.from_pylist(rows[p * per : (p + 1) * per]))

    spec = StageSpec("build", "test_v1", {"method": method, "target_len": target, "name": name,
                                          "n": n_samples, "len": length, "parts": parts}, {})
    return store.produce(spec, body)


def metrics(ref) -> list[dict]:
    return ref.read_table("train_metrics").to_pylist()


# --------------------------------------------------------------------------- the mask trap


@pytest.fixture(scope="module")
def tiny_models():
    return {a: load_model(ModelSpec(), attention=a) for a in ("sdpa", "eager")}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["full", "randomized", "pose", "longrecipe"])
def test_last_logits_depend_on_first_token(tiny_models, attention, method):
    model = tiny_models[attention]
    n = 128
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 256
    pos = torch.from_numpy(positions(method, n))[None]
    with torch.no_grad():
        # the loop's call: explicit mask, full causal attention
        a = causal_lm_forward(model, ids, pos).logits[0, -1]
        b = causal_lm_forward(model, other, pos).logits[0, -1]
        assert (a - b).abs().max() > 1e-4
        # the trap the loop avoids: no mask and no cache make gaps into packed-sequence
        # boundaries, and the first token becomes invisible to the last
        a = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, -1]
        b = model(input_ids=other, position_ids=pos, use_cache=False).logits[0, -1]
    if method == "full":
        assert (a - b).abs().max() > 1e-4  # no gaps, no trap
    else:
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- training


def test_loss_decreases_and_outputs_a_complete_hf_folder(store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples = make_samples(store)
    cfg = TrainConfig(optim=OptimConfig(lr=3e-3, max_steps=12), rope=RopeConfig(theta=40000.0))
    ref = run_train(cfg, samples, ModelSpec(), store, QUIET)

    rows = metrics(ref)
    assert [r["step"] for r in rows] == list(range(1, 13))
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-3:]) < 0.6 * losses[0]
    assert [r["tokens"] for r in rows] == [96 * (i + 1) for i in range(12)]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert max(r["max_position"] for r in rows) > 900  # positions reach into the target window
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)

    folder = ref.path / "files" / "model"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["max_position_embeddings"] == TARGET  # build.target_len of the samples
    assert config["rope_parameters"]["rope_theta"] == 40000.0
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    text = "The cat sat."
    assert tok(text)["input_ids"] == byte_tokenizer()(text)["input_ids"]
    # the saved weights are the trained ones: their loss on the training text is the low one
    s = samples.read_table("samples").to_pylist()[0]
    ids, pos = torch.tensor([s["input_ids"]]), torch.tensor([s["position_ids"]])
    with torch.no_grad():
        loss = causal_lm_forward(model, ids, pos, labels=ids).loss.item()
    assert loss < 0.7 * losses[0]
    assert ref.info["max_position_embeddings"] == TARGET and ref.info["steps"] == 12


def test_grad_accumulation_equals_one_big_batch(store):
    samples = make_samples(store, n_samples=4)
    common = dict(lr=1e-3, max_steps=2, precision="fp32", seed=3)
    a = run_train(TrainConfig(optim=OptimConfig(batch_size=2, grad_accum=2, **common)),
                  samples, ModelSpec(), store, QUIET)
    b = run_train(TrainConfig(optim=OptimConfig(batch_size=4, grad_accum=1, **common)),
                  samples, ModelSpec(), store, QUIET)
    for x, y in zip(metrics(a), metrics(b), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["tokens"] == y["tokens"] == 4 * 96 * x["step"]


def test_bf16_autocast_keeps_fp32_master_weights(store, monkeypatch):
    seen = set()
    real = loop_mod.load_model

    def spy(*args, **kwargs):
        m = real(*args, **kwargs)
        m.model.layers[0].mlp.down_proj.register_forward_hook(  # training steps only, not
            lambda mod, inp, out: seen.add(out.dtype) if mod.training else None  # the head probe
        )
        return m

    monkeypatch.setattr(loop_mod, "load_model", spy)
    samples = make_samples(store, n_samples=2)
    ref = run_train(TrainConfig(optim=OptimConfig(max_steps=2, precision="bf16")),
                    samples, ModelSpec(), store, QUIET)
    assert seen == {torch.bfloat16}
    from safetensors import safe_open

    with safe_open(str(ref.path / "files/model/model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_activation_checkpointing_gives_the_same_losses(store):
    samples = make_samples(store, n_samples=2)
    runs = [
        run_train(TrainConfig(optim=OptimConfig(max_steps=2, lr=1e-3, precision="fp32",
                                                gradient_checkpointing=g)),
                  samples, ModelSpec(), store, QUIET)
        for g in (False, True)
    ]
    a, b = (metrics(r) for r in runs)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)


class Killed(Exception):
    pass


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    cfg = TrainConfig(optim=OptimConfig(
        lr=2e-3, max_steps=8, batch_size=2, grad_accum=2, checkpoint_every=2, schedule="cosine",
        warmup_steps=2,
    ))
    whole = ArtifactStore(tmp_path / "whole")
    broken = ArtifactStore(tmp_path / "broken")
    # 6 samples in 2 parts, 4 per step: the data wraps into new epochs mid-step
    ref_whole = run_train(cfg, make_samples(whole, parts=2), ModelSpec(), whole, QUIET)

    samples = make_samples(broken, parts=2)
    real = loop_mod.save_checkpoint

    def save_then_die(scratch, state, *args):
        if state.step == 6:  # killed after step 6, before its checkpoint: 5 and 6 are redone
            raise Killed
        return real(scratch, state, *args)

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_train(cfg, samples, ModelSpec(), broken, QUIET)
    assert broken.get("train", train_mod.train_spec(cfg, samples, as_source(ModelSpec())).key) is None
    monkeypatch.setattr(loop_mod, "save_checkpoint", real)
    ref = run_train(cfg, samples, ModelSpec(), broken, QUIET)

    assert ref.info["resumed_from_step"] == 4
    keys = ["step", "loss", "lr", "grad_norm", "tokens", "max_position"]
    got = [{k: r[k] for k in keys} for r in metrics(ref)]
    want = [{k: r[k] for k in keys} for r in metrics(ref_whole)]
    assert got == want  # exactly, not approximately
    a = (ref.path / "files/model/model.safetensors").read_bytes()
    b = (ref_whole.path / "files/model/model.safetensors").read_bytes()
    assert a == b
    # the checkpoints (beside the partial folder) are dropped once the artifact is in place
    assert not Path(broken.scratch_dir("train", ref.key)).exists()
    assert not any(p.name == "_scratch" for p in ref.path.iterdir())


def test_sample_stream_visits_every_sample_once_per_epoch(store):
    samples = make_samples(store, n_samples=7, parts=3)
    s = SampleStream(samples, seed=5)
    epoch0 = [s.get(i).sample_id for i in range(7)]
    epoch1 = [s.get(i).sample_id for i in range(7, 14)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(7))
    assert epoch0 != epoch1  # reshuffled each epoch
    assert [SampleStream(samples, seed=5).get(i).sample_id for i in range(3, 10)] == \
        (epoch0 + epoch1)[3:10]  # addressable from any position (resume)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decaying_schedules_reach_zero(schedule):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = make_schedule(opt, OptimConfig(lr=1.0, schedule=schedule, warmup_steps=3, max_steps=10))
    used = []
    for _ in range(10):
        used.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert used[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])  # warmup, then the peak
    assert all(x > y for x, y in zip(used[3:], used[4:], strict=False))  # strictly decays
    assert used[-1] > 0 and sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_anneal_decays_to_zero_and_keeps_the_trained_rope(store):
    samples = make_samples(store, n_samples=2)
    trained = run_train(TrainConfig(optim=OptimConfig(max_steps=1), rope=RopeConfig(type="yarn")),
                        samples, ModelSpec(), store, QUIET)
    replay = make_samples(store, method="full", length=64, target=64, name="replay")
    cfg = AnnealConfig(optim=OptimConfig(lr=1e-3, schedule="linear", max_steps=4))
    ref = run_anneal(cfg, trained, replay, store, QUIET)
    lrs = [r["lr"] for r in metrics(ref)]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert ref.info["lr_after_last_step"] == 0.0
    before = json.loads((trained.path / "files/model/config.json").read_text())
    after = json.loads((ref.path / "files/model/config.json").read_text())
    assert after["rope_parameters"] == before["rope_parameters"]
    assert after["rope_parameters"]["rope_type"] == "yarn"
    assert after["max_position_embeddings"] == before["max_position_embeddings"] == TARGET


# --------------------------------------------------------------------------- bad input


def _key_absent(store, stage="train"):
    return not any(store.iter_refs(stage))


def test_dynamic_rope_is_refused_for_training(store):
    samples = make_samples(store, n_samples=2)
    cfg = TrainConfig(optim=OptimConfig(max_steps=1), rope=RopeConfig(type="dynamic", factor=4))
    with pytest.raises(RopeError, match="batch order"):
        run_train(cfg, samples, ModelSpec(), store, QUIET)
    assert _key_absent(store)


def test_target_shorter_than_the_base_window_fails(store):
    samples = make_samples(store, n_samples=2, length=64, target=128)
    with pytest.raises(TrainError, match="shorter than the model's window 256"):
        run_train(TrainConfig(optim=OptimConfig(max_steps=1)), samples, ModelSpec(), store, QUIET)
    assert _key_absent(store)
    assert not list(Path(store.root).glob("train/*"))  # refused before any work


def test_model_folder_without_weights_fails(store, tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    samples = make_samples(store, n_samples=2)
    with pytest.raises(ModelError, match="no weights"):
        run_train(TrainConfig(), samples, ModelSpec(source=str(folder)), store, QUIET)


def test_position_beyond_the_window_names_the_sample(store):
    samples = make_samples(store, n_samples=2, target=2048)  # positions up to 2047
    cfg = TrainConfig(optim=OptimConfig(max_steps=1), max_position_embeddings=512)
    with pytest.raises(TrainError, match=r"sample \d+ has position id \d+ >= .* 512"):
        run_train(cfg, samples, ModelSpec(), store, QUIET)
    assert _key_absent(store)


def test_samples_without_position_ids_fail_clearly(store):
    table = pa.table({"sample_id": [0], "method": ["full"], "input_ids": [[1, 2, 3]]})
    bad = store.produce(StageSpec("build", "test_v1", {"bad": 1}, {}),
                        lambda w: w.write_table("samples", table))
    with pytest.raises(TrainError, match="no column position_ids"):
        run_train(TrainConfig(max_position_embeddings=512), bad, ModelSpec(), store, QUIET)
    assert _key_absent(store)


def test_anneal_refuses_non_full_replay_samples(store):
    samples = make_samples(store, n_samples=2)
    trained = run_train(TrainConfig(optim=OptimConfig(max_steps=1)), samples, ModelSpec(), store, QUIET)
    with pytest.raises(TrainError, match="method 'longrecipe'"):
        run_anneal(AnnealConfig(), trained, samples, store, QUIET)


# --------------------------------------------------------------------------- the demo model


@pytest.mark.slow
def test_demo_gguf_trains_and_saves_a_loadable_folder(store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not DEMO_GGUF.exists():
        pytest.skip("demo model not fetched (longrecipe data fetch demo)")
    samples = make_samples(store, n_samples=2, length=64, target=16384)
    cfg = TrainConfig(optim=OptimConfig(max_steps=2, lr=1e-5), rope=RopeConfig(type="yarn"),
                      save_dtype="bfloat16")
    ref = run_train(cfg, samples, ModelSpec(source=str(DEMO_GGUF)), store, QUIET)
    folder = ref.path / "files/model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.max_position_embeddings == 16384
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config.rope_parameters["factor"] == 2.0  # 16384 / SmolLM2's 8192
    assert model.dtype == torch.bfloat16
    assert tok.decode(tok("The capital of France")["input_ids"]) == "The capital of France"
    assert all(np.isfinite(r["loss"]) for r in metrics(ref))
