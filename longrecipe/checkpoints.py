"""Resumable training checkpoints in the artifact's scratch folder.

`<partial>/_scratch/ckpt-<step>/` holds, without pickle:
- model.safetensors, optimizer.safetensors + optimizer.json (one process, or DDP where
  every process holds the same state); under FSDP or DeepSpeed accelerate's
  `save_state` writes the sharded model and optimizer instead (`accelerate/`);
- scheduler.json: the learning-rate schedule's state, in every mode (a schedule made
  after `prepare` is not in accelerate's state, so without it a resumed sharded run
  would restart its schedule at step 0);
- rng-<rank>.safetensors: each process's torch generator states;
- state.json, written last: step, data position, tokens, elapsed time, metrics so far.

The folder is written under a temporary name and renamed into place; the previous
checkpoint is removed after.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainState:
    step: int = 0
    position: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    metrics: list[dict] = field(default_factory=list)


def sharded(acc) -> bool:
    """Model and optimizer state split across processes (FSDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def save_checkpoint(scratch: Path, state: TrainState, acc, model, opt, sched) -> Path:
    import torch
    from safetensors.torch import save_file, save_model

    final = scratch / f"ckpt-{state.step:08d}"
    tmp = scratch / f".ckpt-{state.step:08d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if sharded(acc):
        acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
    elif acc.is_main_process:
        save_model(acc.unwrap_model(model), str(tmp / "model.safetensors"))
        save_optimizer(opt, tmp)
    if acc.is_main_process:
        (tmp / "scheduler.json").write_text(json.dumps(sched.state_dict()))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / f"rng-{acc.process_index}.safetensors"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "state.json").write_text(json.dumps({
            "step": state.step, "position": state.position, "tokens": state.tokens,
            "elapsed": state.elapsed, "metrics": state.metrics,
        }))
        tmp.rename(final)
        for old in scratch.glob("ckpt-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def latest_checkpoint(scratch: Path) -> Path | None:
    done = sorted(p for p in scratch.glob("ckpt-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, acc, model, opt, sched) -> TrainState:
    import torch
    from safetensors.torch import load_file, load_model

    if sharded(acc):
        acc.load_state(str(path / "accelerate"))
    else:
        device = "cpu" if acc.device.type == "cpu" else str(acc.device)  # safetensors: no "cpu:0"
        load_model(acc.unwrap_model(model), str(path / "model.safetensors"), device=device)
        load_optimizer(opt, path, device)
    sched.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng_file = path / f"rng-{acc.process_index}.safetensors"
    if rng_file.exists():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    s = json.loads((path / "state.json").read_text())
    return TrainState(s["step"], s["position"], s["tokens"], s["elapsed"], s["metrics"])


def save_optimizer(opt, folder: Path) -> None:
    """Optimizer state without pickle: tensors in safetensors, the rest in JSON."""
    import torch
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors, state = {}, {}
    for idx, entries in sd["state"].items():
        state[str(idx)] = {}
        for name, v in entries.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().contiguous()
                state[str(idx)][name] = {"tensor": f"{idx}.{name}"}
            else:
                state[str(idx)][name] = {"value": v}
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"state": state, "param_groups": sd["param_groups"]}))


def load_optimizer(opt, folder: Path, device) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    meta = json.loads((folder / "optimizer.json").read_text())
    state = {
        int(idx): {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entries.items()}
        for idx, entries in meta["state"].items()
    }
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
