"""Devices a run names (`cuda:N` end to end), the comparison's device slots, a launched
process pinned to one GPU, and the one piece of global state that threads of one process
shared (the seeded initialisation of tiny models)."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import torch

from longrecipe import ArtifactStore, ModelSpec, StageSpec, TinyModelConfig
from longrecipe.config import CompareConfig, RuntimeConfig
from longrecipe.devices import DeviceSlots, branch_devices
from longrecipe.launch import LaunchConfigError, launch, pinned_gpu
from longrecipe.models import (
    ModelError,
    cuda_index,
    is_cuda,
    load_model,
    pick_attention,
    pick_device,
)


def _digest(model) -> str:
    h = hashlib.sha256()
    for _, v in sorted(model.state_dict().items()):
        h.update(v.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two CUDA devices (nothing is placed on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_tiny_models_built_in_threads_equal_one_built_alone():
    """Finding: the tiny preset seeds torch's global generator while it initialises; six
    threads building at once (the comparison's branches) got 5 different models in 6."""
    spec = ModelSpec(tiny=TinyModelConfig(hidden_size=64, num_hidden_layers=2))
    alone = _digest(load_model(spec))
    got, start = [], threading.Barrier(6)

    def build():
        start.wait()
        got.append(_digest(load_model(spec)))

    threads = [threading.Thread(target=build) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [alone] * 6


def test_an_indexed_gpu_is_a_device(two_gpus):
    assert pick_device("cuda:1") == "cuda:1" and pick_device("auto") == "cuda"
    assert is_cuda("cuda:1") and is_cuda("cuda") and not is_cuda("cpu")
    assert cuda_index("cuda:1") == 1 and cuda_index("cuda") is None and cuda_index("cpu") is None
    assert pick_attention("auto", "cuda:1") in ("sdpa", "flash_attention_2")
    with pytest.raises(ModelError, match=r"'cuda:2': torch sees 2 CUDA device\(s\), cuda:0 to cuda:1"):
        pick_device("cuda:2")
    assert RuntimeConfig(device="cuda:1").device == "cuda:1"
    for bad in ("cuda:x", "gpu", "cuda1"):
        with pytest.raises(ValueError, match="device"):
            RuntimeConfig(device=bad)


def test_no_cuda_refuses_an_indexed_gpu_by_name():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="'cuda:1' asked for, but torch sees no CUDA device"):
        pick_device("cuda:1")


def test_branch_devices_from_a_list_a_count_or_none(two_gpus):
    assert branch_devices(None, "cpu") == ["cpu"]
    assert branch_devices(["cpu", "cpu"], "cpu") == ["cpu", "cpu"]
    assert branch_devices(3, "cpu") == ["cpu"] * 3  # CPU slots on a CPU run
    assert branch_devices(2, "auto") == ["cuda:0", "cuda:1"]
    assert branch_devices(["cuda:1", "cuda:0"], "cpu") == ["cuda:1", "cuda:0"]
    with pytest.raises(ModelError, match=r"compare.devices: device 'cuda:2'"):
        branch_devices(["cuda:0", "cuda:2"], "auto")
    with pytest.raises(ModelError, match=r"compare.devices: device 'cuda:2'"):
        branch_devices(3, "cuda")
    for bad, msg in (([], "empty"), (["auto"], "'auto' is not"), (0, "at least 1")):
        with pytest.raises(ValueError, match=msg):
            CompareConfig(devices=bad)


def test_device_slots_hand_each_device_to_one_branch_at_a_time():
    slots = DeviceSlots(["cuda:0", "cuda:1"])
    assert slots.concurrent and not DeviceSlots(["cpu"]).concurrent
    holding: list[str] = []
    most = []
    lock = threading.Lock()

    def branch():
        with slots.take() as device:
            with lock:
                assert device not in holding
                holding.append(device)
                most.append(len(holding))
            time.sleep(0.02)
            with lock:
                holding.remove(device)

    threads = [threading.Thread(target=branch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(most) == 2 and not holding


def test_a_launched_stage_on_cuda_n_sees_that_gpu_alone(two_gpus, monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert pinned_gpu("cuda:1") == "1" and pinned_gpu("cuda") is None and pinned_gpu("cpu") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")
    assert pinned_gpu("cuda:1") == "6"  # the parent's second visible GPU
    spec = StageSpec("train", "test_v1", {}, {})
    with pytest.raises(LaunchConfigError, match="device cuda:1 is one GPU, but the stage asks for 2 processes"):
        launch(spec, CompareConfig(), {}, ArtifactStore(tmp_path), RuntimeConfig(device="cuda:1"),
               processes=2, accelerate_config=None, mixed_precision="no")


def test_the_cli_names_a_bad_device_and_exits_2():
    from typer.testing import CliRunner

    from longrecipe.cli import app

    for command in ("run", "compare"):
        r = CliRunner().invoke(app, [command, "configs/tiny.yaml", "--device", "gpu:1"])
        assert r.exit_code == 2 and "--device 'gpu:1': choose auto, cpu, cuda or cuda:N" in r.output
