"""Apply a RopeConfig to a loaded model, so that it trains and saves with the new RoPE.

transformers 5.x reads RoPE from `config.rope_parameters` (a dict that must hold
`rope_theta`) and bakes the frequencies into each rotary module when the model
is built. Changing the dict on a loaded model therefore does nothing until the
rotary modules are rebuilt from the config; this module does both, and sets
`max_position_embeddings` to the target window so the saved config.json
describes the extended model.
"""

from __future__ import annotations

from typing import Any

from longrecipe.config import RopeConfig
from longrecipe.errors import InputError

DYNAMIC_REFUSED = (
    "rope.type 'dynamic' is refused for training: dynamic NTK recomputes the frequencies "
    "whenever a batch's position ids exceed max_position_embeddings and resets them on the "
    "next short batch, so with gapped position ids (LongRecipe, PoSE, randomized) the "
    "result depends on batch order. Use 'yarn', 'linear', 'llama3' or a larger rope.theta"
)


class RopeError(InputError):
    """A RoPE change that cannot be applied; the message names the field."""


def rope_parameters(rope: RopeConfig | None, config: Any, target: int) -> dict[str, Any]:
    """The `rope_parameters` dict for `config` (a transformers config) after `rope`.

    `target` is the new max_position_embeddings. Factors left unset are derived as
    target / original window, the usual choice for linear, yarn and llama3.
    """
    current = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in current:
        raise RopeError(
            f"model type {config.model_type!r} has no RoPE parameters (config.rope_parameters "
            "holds no rope_theta): RoPE settings cannot be applied to it"
        )
    if rope is None:
        return current
    theta = float(rope.theta) if rope.theta is not None else float(current["rope_theta"])
    if rope.type == "default":
        return {"rope_type": "default", "rope_theta": theta}
    original = rope.original_max_position_embeddings or _base_window(config, current)
    factor = float(rope.factor) if rope.factor is not None else target / original
    if factor < 1.0:
        raise RopeError(
            f"rope.factor {factor:g} is below 1 (target {target}, original window {original}): "
            "scaling would shrink the window"
        )
    params: dict[str, Any] = {"rope_type": rope.type, "rope_theta": theta, "factor": factor}
    if rope.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if rope.type == "llama3":
        params["low_freq_factor"] = rope.low_freq_factor
        params["high_freq_factor"] = rope.high_freq_factor
    return params


def apply_rope(
    model: Any,
    rope: RopeConfig | None,
    max_position_embeddings: int | None = None,
    *,
    training: bool = True,
) -> dict[str, Any]:
    """Set the model's RoPE and window in its config and rebuild its rotary modules.

    Returns the new `rope_parameters`. With training=True a `dynamic` RoPE is refused
    (see DYNAMIC_REFUSED), whether asked for here or already in the model's config.
    """
    config = model.config
    target = int(max_position_embeddings or config.max_position_embeddings)
    params = rope_parameters(rope, config, target)
    if training and params.get("rope_type") == "dynamic":
        raise RopeError(DYNAMIC_REFUSED)
    config.rope_parameters = params
    config.max_position_embeddings = target
    n = rebuild_rotary(model)
    if n == 0:
        raise RopeError(
            f"model class {type(model).__name__} has no rotary module with `inv_freq`: "
            "cannot apply a RoPE change to it"
        )
    return params


def rebuild_rotary(model: Any) -> int:
    """Re-create every rotary-embedding module from the (changed) config; returns how many."""
    import torch

    targets = [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "inv_freq") and hasattr(module, "rope_type")
    ]
    for name, module in targets:
        device = module.inv_freq.device
        new = type(module)(config=model.config)
        new.to(device)
        # keep the buffers in fp32 even for a half-precision model, as construction does
        new.inv_freq = new.inv_freq.to(device=device, dtype=torch.float32)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return len(targets)


def inv_freq(model: Any) -> Any:
    """The inverse frequencies of the model's (first) rotary module."""
    for _, module in model.named_modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_type"):
            return module.inv_freq
    raise RopeError(f"model class {type(model).__name__} has no rotary module")


def _base_window(config: Any, current: dict[str, Any]) -> int:
    # a model already scaled (e.g. Llama-3.1's llama3 RoPE) keeps its pre-training window
    return int(current.get("original_max_position_embeddings") or config.max_position_embeddings)
