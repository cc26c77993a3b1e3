"""More than one process: the global batch, the key, `accelerate launch` on CPUs (DDP over
gloo, DeepSpeed where it is installed), resume after kill -9, and the DeepSpeed settings
that come from our optim fields.

Multi-process tests are `integration` (each launch costs 10-20 s on 2 cores); the
DeepSpeed ones skip without the `deepspeed` package (not a project dependency).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

import longrecipe.checkpoints as checkpoints_mod
import longrecipe.loop as loop_mod
from longrecipe import ArtifactStore, ModelSpec, OptimConfig, StageSpec, TrainConfig, load_config
from longrecipe.config import ConfigError, RuntimeConfig
from longrecipe.distributed import configure_deepspeed, deepspeed_settings
from longrecipe.launch import LaunchConfigError, LaunchError, launch_command
from longrecipe.model_io import as_source
from longrecipe.train import TrainError, run_train, train_spec
from tests.conftest import QUIET, ROOT
from tests.test_train import TEXT, metrics, positions

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
KEYS = ["step", "loss", "lr", "grad_norm", "tokens", "max_position"]


def ragged_samples(store: ArtifactStore, lengths=(96, 40, 73, 120, 55, 88, 31, 64)):
    """LongRecipe-style samples of unequal length (the per-rank mean trap)."""
    ids = np.frombuffer(TEXT, dtype=np.uint8).astype(np.int32)
    rows = []
    for i, n in enumerate(lengths):
        pos = positions("longrecipe", n, seed=i)
        rows.append({"sample_id": i, "method": "longrecipe", "input_ids": ids[i * 11: i * 11 + n].tolist(),
                     "position_ids": pos.astype(np.int32).tolist(), "n_tokens": n,
                     "max_position": int(pos.max())})
    spec = StageSpec("build", "test_v1", {"target_len": 1024, "ragged": list(lengths)}, {})
    return store.produce(spec, lambda w: w.write_table("samples", pa.Table.from_pylist(rows)))


def weights(ref) -> dict[str, torch.Tensor]:
    return load_file(str(ref.path / "files/model/model.safetensors"))


def assert_same_training(a, b, rel=1e-6):
    for x, y in zip(metrics(a), metrics(b), strict=True):
        assert x["step"] == y["step"] and x["tokens"] == y["tokens"]
        assert x["max_position"] == y["max_position"] and x["lr"] == y["lr"]
        assert y["loss"] == pytest.approx(x["loss"], rel=rel)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=10 * rel)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=rel), k


# --------------------------------------------------------------------------- unit


def test_num_processes_changes_who_computes_not_the_key_or_the_batch(store, tmp_path):
    """Finding: the artifact's key changed with num_processes and the global batch grew
    with it. Processes share the step's micro-batches: batch_size x grad_accum samples,
    one key."""
    samples = ragged_samples(store)
    src = as_source(ModelSpec())
    base = OptimConfig(grad_accum=4, max_steps=2)
    keys = {train_spec(TrainConfig(optim=base.model_copy(update=u)), samples, src).key for u in (
        {}, {"num_processes": 2}, {"num_processes": 4}, {"loss_chunk_tokens": 64},
        {"accelerate_config": "configs/accelerate/ddp.yaml"},
    )}
    assert len(keys) == 1
    assert train_spec(TrainConfig(optim=base.model_copy(update={"grad_accum": 2})), samples, src).key not in keys
    assert OptimConfig(grad_accum=4, num_processes=2).global_batch == OptimConfig(grad_accum=4).global_batch == 4
    assert OptimConfig(grad_accum=4).per_process_accum(2) == 2
    with pytest.raises(ConfigError, match=r"train\.optim.*multiple of the number of processes \(3\)"):
        load_config(ROOT / "configs/tiny.yaml", ["train.optim.num_processes=3"])


def test_deepspeed_gets_micro_batch_accumulation_clipping_and_precision_from_optim():
    """Finding: under DeepSpeed `prepare(model, optimizer)` without a dataloader raised on
    `train_micro_batch_size_per_gpu: auto`, and clipping was forced to 1.0. Our fields are
    written into the plugin before prepare, and accelerate's own filling of `auto`
    entries (run here as prepare runs it) leaves them alone."""
    import yaml
    from accelerate.utils import DeepSpeedPlugin

    ds = yaml.safe_load((ROOT / "configs/accelerate/deepspeed-zero3-offload.yaml").read_text())["deepspeed_config"]
    plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"], offload_optimizer_device=ds["offload_optimizer_device"],
                             offload_param_device=ds["offload_param_device"],
                             zero3_save_16bit_model=ds["zero3_save_16bit_model"])
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what accelerate raises on
    optim = OptimConfig(batch_size=2, grad_accum=96, max_grad_norm=0.5, precision="bf16")
    configure_deepspeed(plugin, optim, processes=4)
    plugin.deepspeed_config_process(must_match=False, gradient_clipping=1.0)  # accelerate's fill
    c = plugin.deepspeed_config
    assert c["train_micro_batch_size_per_gpu"] == 2 and not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert c["gradient_accumulation_steps"] == 24 == plugin.gradient_accumulation_steps  # 96 / 4
    assert c["train_batch_size"] == 2 * 96  # the global batch, as in one process
    assert c["gradient_clipping"] == 0.5 and c["bf16"]["enabled"] is True
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    off = deepspeed_settings(OptimConfig(max_grad_norm=None, precision="fp32"), 1)
    assert off["gradient_clipping"] == 0.0 and off["bf16.enabled"] is False


def test_cpu_launch_command_really_starts_several_processes(tmp_path):
    """Finding: `accelerate launch --cpu --num_processes 2` runs one process. Several CPU
    processes go through accelerate's torchrun launcher; one stays on `--cpu`; a DeepSpeed
    file never gets `--cpu` (it would drop DeepSpeed)."""
    job = tmp_path / "job.json"
    two = launch_command(job, processes=2, accelerate_config=None, mixed_precision="no", device="cpu")
    assert "--multi_gpu" in two and "--cpu" not in two and two[two.index("--num_processes") + 1] == "2"
    one = launch_command(job, processes=1, accelerate_config=None, mixed_precision="no", device="cpu")
    assert "--cpu" in one and "--multi_gpu" not in one
    ds = str(ROOT / "configs/accelerate/deepspeed-zero3-offload.yaml")
    cmd = launch_command(job, processes=1, accelerate_config=ds, mixed_precision="bf16", device="cpu")
    assert "--cpu" not in cmd and "--multi_gpu" not in cmd and cmd[-3:] == ["longrecipe.launched", "--job", str(job)]


def test_fsdp_on_a_cpu_is_refused_not_silently_ddp(store, tmp_path):
    """accelerate 1.15 applies FSDP only on GPU-like devices: on a CPU it wraps the model in
    DDP without a word. Refused before anything starts; so is an accumulation that the
    accelerate file's processes cannot share."""
    samples = ragged_samples(store)
    cfg = TrainConfig(optim=OptimConfig(max_steps=1, grad_accum=8, precision="fp32",
                                        accelerate_config=str(ROOT / "configs/accelerate/fsdp.yaml")))
    with pytest.raises(LaunchConfigError, match="FSDP on a CPU is not supported"):
        run_train(cfg, samples, ModelSpec(), store, QUIET)
    two = tmp_path / "two.yaml"
    two.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: 1\n")
    with pytest.raises(TrainError, match=r"grad_accum \(3\) must be a multiple .* \(2\)"):
        run_train(TrainConfig(optim=OptimConfig(max_steps=1, grad_accum=3, accelerate_config=str(two))),
                  samples, ModelSpec(), store, QUIET)
    assert not any(store.iter_refs("train"))


def test_resumed_sharded_run_keeps_the_learning_rate_schedule(tmp_path, monkeypatch):
    """Finding: with sharded checkpoints (accelerate's save_state, used under FSDP and
    DeepSpeed) the scheduler, made after prepare, was never saved, so a resumed run
    restarted its schedule at step 0. The sharded checkpoint path, run in one process."""
    monkeypatch.setattr(checkpoints_mod, "sharded", lambda acc: True)
    cfg = TrainConfig(optim=OptimConfig(lr=2e-3, max_steps=6, checkpoint_every=2, schedule="cosine",
                                        warmup_steps=1, precision="fp32"))
    whole, broken = ArtifactStore(tmp_path / "whole"), ArtifactStore(tmp_path / "broken")
    want = run_train(cfg, ragged_samples(whole), ModelSpec(), whole, QUIET)
    samples = ragged_samples(broken)
    real = loop_mod.save_checkpoint

    def die_at_4(scratch, state, *args):
        if state.step == 4:
            raise KeyboardInterrupt
        return real(scratch, state, *args)

    monkeypatch.setattr(loop_mod, "save_checkpoint", die_at_4)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, samples, ModelSpec(), broken, QUIET)
    ckpt = next((tmp_path / "broken").glob("train/*.scratch/ckpt-*"))
    assert (ckpt / "accelerate").is_dir() and (ckpt / "scheduler.json").exists()
    monkeypatch.setattr(loop_mod, "save_checkpoint", real)
    got = run_train(cfg, samples, ModelSpec(), broken, QUIET)
    assert got.info["resumed_from_step"] == 2
    assert [r["lr"] for r in metrics(got)] == [r["lr"] for r in metrics(want)]
    assert [r["loss"] for r in metrics(got)] == pytest.approx([r["loss"] for r in metrics(want)], rel=1e-6)


# --------------------------------------------------------------------------- launched


@pytest.mark.integration
def test_two_processes_equal_one_with_twice_the_accumulation_on_unequal_samples(tmp_path):
    """Findings: `num_processes: 2` trained in ONE process; across ranks the token mean
    divided by each rank's own count (exact only for equal lengths). Two gloo processes
    under `accelerate launch` (DDP), each one micro-batch of a 2-micro-batch step, equal
    one process that accumulates both: same key, train_metrics, fp32 weights to 1e-6,
    on samples of unequal length."""
    optim = dict(lr=1e-3, max_steps=4, batch_size=1, grad_accum=2, precision="fp32",
                 schedule="cosine", warmup_steps=1)
    one_store, two_store = ArtifactStore(tmp_path / "one"), ArtifactStore(tmp_path / "two")
    one = run_train(TrainConfig(optim=OptimConfig(**optim)), ragged_samples(one_store), ModelSpec(),
                    one_store, QUIET)
    two = run_train(TrainConfig(optim=OptimConfig(num_processes=2, **optim)), ragged_samples(two_store),
                    ModelSpec(), two_store, QUIET)
    assert two.key == one.key
    assert two.info["num_processes"] == 2 and two.info["distributed"] == "MULTI_CPU"
    assert two.info["launched"] is True and one.info["launched"] is False
    assert_same_training(one, two)
    manifest = json.loads((two.path / "manifest.json").read_text())
    assert "num_processes" not in manifest["config"]["optim"]
    assert not list((tmp_path / "two").glob("train/*.partial"))  # committed once, by process 0


@pytest.mark.integration
def test_kill_9_during_a_two_process_run_resumes_with_the_same_schedule(tmp_path):
    """A hard kill (SIGKILL of process 0 after step 3; torchrun then stops the other)
    leaves the step-2 checkpoint; the rerun resumes there and its lr, loss and token
    columns equal the uninterrupted run's."""
    optim = OptimConfig(lr=2e-3, max_steps=5, grad_accum=2, checkpoint_every=2, schedule="linear",
                        warmup_steps=1, precision="fp32", num_processes=2)
    cfg = TrainConfig(optim=optim)
    whole, broken = ArtifactStore(tmp_path / "whole"), ArtifactStore(tmp_path / "broken")
    want = run_train(cfg.model_copy(update={"optim": optim.model_copy(update={"num_processes": 1})}),
                     ragged_samples(whole), ModelSpec(), whole, QUIET)
    samples = ragged_samples(broken)
    killer = RuntimeConfig(progress=False, device="cpu", kill_at_step=3)
    with pytest.raises(LaunchError, match="exited with"):
        run_train(cfg, samples, ModelSpec(), broken, killer)
    assert not any(broken.iter_refs("train"))
    got = run_train(cfg, samples, ModelSpec(), broken, QUIET)
    assert got.info["resumed_from_step"] == 2 and got.info["num_processes"] == 2
    assert_same_training(want, got)


@pytest.mark.integration
@needs_deepspeed
def test_deepspeed_zero3_two_processes_equal_one_and_resume_after_kill_9(tmp_path):
    """DeepSpeed ZeRO-3 (sharded parameters, gradients and optimizer state) in two CPU
    processes under `accelerate launch`: prepare works without a dataloader, the step
    equals one process, and after kill -9 the sharded checkpoint resumes with the same
    learning-rate column."""
    acc = tmp_path / "zero3.yaml"
    acc.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 2\n"
        "num_machines: 1\nmixed_precision: 'no'\ndeepspeed_config:\n  zero_stage: 3\n"
        "  offload_optimizer_device: none\n  offload_param_device: none\n  zero3_init_flag: false\n"
        "  zero3_save_16bit_model: true\n"
    )
    optim = OptimConfig(lr=2e-3, max_steps=4, grad_accum=2, checkpoint_every=2, schedule="cosine",
                        warmup_steps=1, precision="fp32", max_grad_norm=0.5, accelerate_config=str(acc))
    cfg = TrainConfig(optim=optim)
    whole, broken = ArtifactStore(tmp_path / "whole"), ArtifactStore(tmp_path / "broken")
    want = run_train(cfg.model_copy(update={"optim": optim.model_copy(update={"accelerate_config": None})}),
                     ragged_samples(whole), ModelSpec(), whole, QUIET)
    samples = ragged_samples(broken)
    killer = RuntimeConfig(progress=False, device="cpu", kill_at_step=3)
    with pytest.raises(LaunchError):
        run_train(cfg, samples, ModelSpec(), broken, killer)
    ckpt = next((tmp_path / "broken").glob("train/*.scratch/ckpt-*"))
    assert (ckpt / "accelerate").is_dir()  # the sharded format
    got = run_train(cfg, samples, ModelSpec(), broken, QUIET)
    assert got.info["distributed"] == "DEEPSPEED" and got.info["num_processes"] == 2
    assert got.info["resumed_from_step"] == 2
    assert [r["lr"] for r in metrics(got)] == [r["lr"] for r in metrics(want)]
    assert_same_training(want, got, rel=1e-5)
