"""The merge stage: exact arithmetic, dtypes, tied embeddings, mismatches, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longrecipe import MergeConfig, ModelSpec, OptimConfig, TrainConfig
from longrecipe.merge import MergeError, merge_folders, run_merge, write_safetensors
from longrecipe.train import run_train
from tests.conftest import QUIET

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}


def folder(path, tensors: dict, config: dict | None = None, **extra_files):
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    for name, text in extra_files.items():
        (path / name.replace("_", ".")).write_text(text)
    return path


def tensors(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(32, 8, generator=g).to(dtype),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).to(dtype),
        "model.norm.weight": torch.rand(8, generator=g).to(dtype),
    }


@pytest.mark.parametrize("weight", [0.0, 1.0, 0.5, 0.25])
def test_weights_give_original_annealed_and_average_exactly(tmp_path, weight):
    o, a = tensors(0), tensors(1)
    orig = folder(tmp_path / "o", o)
    ann = folder(tmp_path / "a", a, tokenizer_json="{}")
    stats = merge_folders(orig, ann, tmp_path / "out", weight)
    got = load_file(str(tmp_path / "out/model.safetensors"))
    assert set(got) == set(a) and stats["tensors"] == 3
    for k in a:
        if weight == 0.0:
            assert torch.equal(got[k], o[k])
        elif weight == 1.0:
            assert torch.equal(got[k], a[k])
        elif weight == 0.5:
            assert torch.equal(got[k], (o[k] + a[k]) / 2)
        else:
            assert torch.equal(got[k], 0.75 * o[k] + 0.25 * a[k])
    assert (tmp_path / "out/tokenizer.json").read_text() == "{}"  # non-weight files copied
    assert json.loads((tmp_path / "out/config.json").read_text()) == CONFIG


def test_dtype_of_the_annealed_model_is_kept(tmp_path):
    o, a = tensors(0, torch.float32), tensors(1, torch.bfloat16)
    merge_folders(folder(tmp_path / "o", o), folder(tmp_path / "a", a), tmp_path / "out", 0.5)
    got = load_file(str(tmp_path / "out/model.safetensors"))
    for k in a:
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], (0.5 * o[k] + 0.5 * a[k].float()).to(torch.bfloat16))


def test_shape_mismatch_names_the_tensor(tmp_path):
    o = tensors(0)
    o["model.layers.0.mlp.up_proj.weight"] = torch.zeros(12, 8)
    with pytest.raises(MergeError, match=r"up_proj.weight.*\(12, 8\) != .*\(16, 8\)"):
        merge_folders(folder(tmp_path / "o", o), folder(tmp_path / "a", tensors(1)),
                      tmp_path / "out", 0.5)


def test_different_architectures_or_missing_tensors_fail(tmp_path):
    other = {**CONFIG, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    with pytest.raises(MergeError, match="model_type differs"):
        merge_folders(folder(tmp_path / "o", tensors(0), other), folder(tmp_path / "a", tensors(1)),
                      tmp_path / "out", 0.5)
    less = tensors(0)
    del less["model.norm.weight"]
    with pytest.raises(MergeError, match="model.norm.weight.*missing from the original"):
        merge_folders(folder(tmp_path / "o2", less), folder(tmp_path / "a2", tensors(1)),
                      tmp_path / "out2", 0.5)


def test_tied_head_saved_on_one_side_only(tmp_path):
    """A tied head may be saved explicitly by one model and left out by the other."""
    o, a = tensors(0), tensors(1)
    a["lm_head.weight"] = a["model.embed_tokens.weight"].clone()
    merge_folders(folder(tmp_path / "o", o), folder(tmp_path / "a", a), tmp_path / "out", 0.5)
    got = load_file(str(tmp_path / "out/model.safetensors"))
    want = (o["model.embed_tokens.weight"] + a["model.embed_tokens.weight"]) / 2
    assert torch.equal(got["lm_head.weight"], want)
    assert torch.equal(got["model.embed_tokens.weight"], want)
    # the other way round: the original's explicit copy of the tied head is not needed
    o2 = {**tensors(0), "lm_head.weight": tensors(0)["model.embed_tokens.weight"]}
    merge_folders(folder(tmp_path / "o2", o2), folder(tmp_path / "a2", tensors(1)),
                  tmp_path / "out2", 0.5)
    assert "lm_head.weight" not in load_file(str(tmp_path / "out2/model.safetensors"))
    # but an untied original head is a different model
    untied = {**CONFIG, "tie_word_embeddings": False}
    with pytest.raises(MergeError, match="tie_word_embeddings differs"):
        merge_folders(folder(tmp_path / "o3", o2, untied), folder(tmp_path / "a3", tensors(1)),
                      tmp_path / "out3", 0.5)


def test_sharded_annealed_model_keeps_its_shards(tmp_path):
    o, a = tensors(0), tensors(1)
    orig = folder(tmp_path / "o", o)
    ann = tmp_path / "a"
    ann.mkdir()
    names = sorted(a)
    shard_of = {n: f"model-0000{i % 2 + 1}-of-00002.safetensors" for i, n in enumerate(names)}
    for shard in set(shard_of.values()):
        save_file({n: a[n] for n in names if shard_of[n] == shard}, str(ann / shard))
    (ann / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard_of}))
    (ann / "config.json").write_text(json.dumps(CONFIG))
    stats = merge_folders(orig, ann, tmp_path / "out", 0.5)
    assert stats["shards"] == 2
    for n, shard in shard_of.items():
        assert torch.equal(load_file(str(tmp_path / "out" / shard))[n], (o[n] + a[n]) / 2)


def test_streamed_safetensors_reads_back(tmp_path):
    ts = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7), "c": torch.tensor(2.5)}
    with safe_open(str(_save(tmp_path / "src.safetensors", ts)), "pt") as f:
        entries = [(k, f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in ts]
    write_safetensors(tmp_path / "out.safetensors", entries, iter(ts.values()), {"format": "pt"})
    back = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in ts.items())


def _save(path, ts):
    save_file(ts, str(path))
    return path


def test_peak_memory_stays_near_one_tensor_pair(tmp_path):
    """Merging two 96 MB models in a fresh process raises its peak RSS by well under one model."""
    n, shape = 24, (1024, 1024)  # 24 tensors of 4 MB
    for name, seed in (("o", 0), ("a", 1)):
        g = torch.Generator().manual_seed(seed)
        folder(tmp_path / name, {f"layer{i}.weight": torch.randn(*shape, generator=g) for i in range(n)})
    model_bytes = n * shape[0] * shape[1] * 4
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from longrecipe.merge import merge_folders
        import torch
        torch.ones(4) * 2  # first-op set-up out of the measurement
        def peak():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        before = peak()
        root = Path({str(tmp_path)!r})
        merge_folders(root / "o", root / "a", root / "out", 0.5)
        print(peak() - before)
    """)
    # pin glibc's mmap threshold: by default it rises after the first large free and then
    # keeps a bounded pool of freed 4 MB blocks on the heap, noise unrelated to model size
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         check=True)
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 0.5 * model_bytes, f"peak RSS grew by {grew / 2**20:.0f} MB"
    a = load_file(str(tmp_path / "a/model.safetensors"))["layer3.weight"]
    o = load_file(str(tmp_path / "o/model.safetensors"))["layer3.weight"]
    assert torch.equal(load_file(str(tmp_path / "out/model.safetensors"))["layer3.weight"], (o + a) / 2)


def test_run_merge_materialises_the_tiny_original_and_keeps_the_trained_config(store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longrecipe.models import load_model
    from tests.test_train import make_samples

    samples = make_samples(store, n_samples=2)
    trained = run_train(TrainConfig(optim=OptimConfig(max_steps=2, lr=1e-2)), samples,
                        ModelSpec(), store, QUIET)
    ref = run_merge(MergeConfig(weight=0.5), ModelSpec(), trained, store, QUIET)
    assert ref.info["original_materialised"] is True and ref.info["original_kind"] == "tiny"
    out = ref.path / "files/model"
    merged = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert merged.config.max_position_embeddings == 1024  # the trained window, kept
    base = load_model(ModelSpec()).state_dict()
    tuned = load_file(str(trained.path / "files/model/model.safetensors"))
    for k, v in merged.state_dict().items():
        if k in tuned:
            assert torch.equal(v, (base[k] + tuned[k]) / 2), k
    assert not (ref.path / "_scratch").exists() and not Path(store.scratch_dir("merge", ref.key)).exists()
    # the same inputs again: the finished artifact, not a second merge
    assert run_merge(MergeConfig(weight=0.5), ModelSpec(), trained, store, QUIET).key == ref.key
