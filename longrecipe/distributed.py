"""The Accelerator of a training run: its device, how many micro-batches each process
runs, and the DeepSpeed settings that come from our own optim fields.

What accelerate 1.15 does on its own, and why it is overridden here (read in its
source, `accelerate/state.py`, `accelerator.py`, `utils/dataclasses.py`):

- DeepSpeed: `prepare(model, optimizer)` without a dataloader cannot resolve
  `train_micro_batch_size_per_gpu: auto` (it raises), and `gradient_clipping: auto` is
  filled with 1.0 whatever our `max_grad_norm` says. `configure_deepspeed` writes the
  micro-batch, the per-process accumulation, the global batch, the clipping and the
  precision into the plugin before `prepare`.
- DeepSpeed on a CPU: accelerate takes its DeepSpeed branch only when the Accelerator
  is not told `cpu=True`, and without a backend named it counts one process while
  DeepSpeed runs several; so under a DeepSpeed launch on a CPU the Accelerator gets
  `cpu=False` and gloo (DeepSpeed's own CPU accelerator then runs it).
- FSDP on a CPU: accelerate applies FSDP only to GPU-like distributed types; on a CPU
  it silently wraps the model in DDP instead. `check_distributed` refuses any run
  whose Accelerator is not what the launcher asked for.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from longrecipe.batches import TrainError
from longrecipe.config import OptimConfig, RuntimeConfig


def launcher_asks_for() -> str | None:
    """What the enclosing `accelerate launch` set up: "deepspeed", "fsdp" or None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def make_accelerator(runtime: RuntimeConfig, optim: OptimConfig, project_dir: str | None = None):
    """An Accelerator on the runtime's device, accumulating this process's share of the
    step's micro-batches. Mixed precision is torch.autocast in the loop (accelerate
    keeps one process-wide precision, and tests switch it), unless a launched process
    was given one."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from longrecipe.models import cuda_index, pick_device

    device = pick_device(runtime.device)
    if cuda_index(device) is not None:
        import torch

        # accelerate puts a one-process run on `cuda`, the current GPU: make it the one named
        torch.cuda.set_device(cuda_index(device))
    asked = launcher_asks_for()
    kwargs: dict[str, Any] = {"cpu": device == "cpu"}
    if asked == "deepspeed" and device == "cpu":
        kwargs = {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    if project_dir is not None and importlib.util.find_spec("tensorboard") is not None:
        kwargs.update(log_with="tensorboard", project_dir=project_dir)
    acc = Accelerator(**kwargs)
    check_distributed(acc, asked)
    try:
        acc.gradient_accumulation_steps = optim.per_process_accum(acc.num_processes)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if acc.log_with:
        acc.init_trackers("tensorboard")
    return acc


def check_distributed(acc, asked: str | None) -> None:
    """The Accelerator must be what the launcher asked for, never a silent fallback."""
    from accelerate.utils import DistributedType

    want = {"deepspeed": DistributedType.DEEPSPEED, "fsdp": DistributedType.FSDP}.get(asked or "")
    if want is not None and acc.distributed_type != want:
        why = (" (accelerate 1.15 applies FSDP only on GPU-like devices; on a CPU it would "
               "train with plain DDP)" if asked == "fsdp" else "")
        raise TrainError(
            f"the accelerate config asks for {asked}, but accelerate set up "
            f"{acc.distributed_type.value} on {acc.device}{why}: use a GPU, or another "
            "accelerate config"
        )


def deepspeed_settings(optim: OptimConfig, processes: int) -> dict[str, Any]:
    """Our optim fields as DeepSpeed config entries (dotted keys)."""
    local = optim.per_process_accum(processes)
    return {
        "train_micro_batch_size_per_gpu": optim.batch_size,
        "gradient_accumulation_steps": local,
        "train_batch_size": optim.batch_size * local * processes,
        "gradient_clipping": float(optim.max_grad_norm or 0.0),  # 0: DeepSpeed does not clip
        "bf16.enabled": optim.precision == "bf16",
        "fp16.enabled": False,
    }


def configure_deepspeed(plugin, optim: OptimConfig, processes: int) -> dict[str, Any]:
    """Write `deepspeed_settings` into an accelerate DeepSpeedPlugin (before `prepare`)."""
    settings = deepspeed_settings(optim, processes)
    for dotted, value in settings.items():
        node = plugin.deepspeed_config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    plugin.gradient_accumulation_steps = settings["gradient_accumulation_steps"]
    plugin.gradient_clipping = settings["gradient_clipping"]
    return settings


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED
