"""What the model stages (train, anneal, merge) share around a model: checking a source
holds weights, saving a complete Hugging Face folder, switching activation
checkpointing, and keeping transformers' own bars and torch's thread count inside a
stage.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from longrecipe.artifacts import ArtifactRef
from longrecipe.config import ModelSpec
from longrecipe.models import ModelError, ModelSource, resolve
from longrecipe.progress import quiet_hf as quiet_transformers  # noqa: F401 (train, anneal, merge)


def as_source(model: ModelSpec | ModelSource | ArtifactRef) -> ModelSource:
    return model if isinstance(model, ModelSource) else resolve(model)


def check_weights(src: ModelSource) -> None:
    """A local folder must hold weights, not only a config."""
    if src.kind != "folder":
        return
    assert src.path is not None
    patterns = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
    if not any(any(src.path.glob(p)) for p in patterns):
        raise ModelError(
            f"model folder {src.path} has a config.json but no weights "
            "(*.safetensors or pytorch_model*.bin)"
        )


def save_model_folder(model, tokenizer, folder: Path, dtype: str, state_dict: dict | None = None) -> None:
    """A folder that AutoModelForCausalLM and AutoTokenizer load as is. `model` is the
    unwrapped model; `state_dict` the gathered weights of a sharded one (else the model's
    own are saved)."""
    import torch

    activation_checkpointing(model, False)
    model.config.use_cache = True
    model.eval()
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    if state_dict is None:
        model.to(torch_dtype)
    else:  # a sharded model's local parameters are partitions: cast the gathered copy
        state_dict = {k: v.to(torch_dtype) for k, v in state_dict.items()}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
    if state_dict is not None:
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = dtype
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(folder))


def activation_checkpointing(model, on: bool) -> None:
    # transformers 5.x renamed gradient_* to activation_checkpointing_*; accept both
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    elif not hasattr(model, "is_activation_checkpointing") and model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()


def pad_id(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad or 0)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
