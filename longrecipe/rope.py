"""Apply a RopeConfig to a loaded model, so that it trains and saves with the new RoPE.

transformers 5.x reads RoPE from `config.rope_parameters` (a dict that must hold
`rope_theta`) and bakes the frequencies into each rotary module when the model
is built. Changing the dict on a loaded model therefore does nothing until the
rotary modules are rebuilt from the config; this module does both, and sets
`max_position_embeddings` to the target window so the saved config.json
describes the extended model. The model's dict is updated in place of being
rebuilt: keys a RopeConfig does not set (Phi-3's partial_rotary_factor, an
existing llama3 or yarn scaling) are kept, and dropping a scaling needs
`replace_scaling: true`.
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


# Keys that belong to a scaling rule; replacing the rule (replace_scaling) drops them.
# Every other key of rope_parameters (partial_rotary_factor, mrope_section, ...) is kept.
SCALING_KEYS = frozenset({
    "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "short_factor",
    "long_factor", "truncate",
})
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's


def rope_parameters(rope: RopeConfig | None, config: Any, target: int) -> dict[str, Any]:
    """The `rope_parameters` dict for `config` (a transformers config) after `rope`.

    The model's own dict is updated, never rebuilt: every key `rope` does not set is
    kept (a Phi-3 model keeps its partial_rotary_factor, a Llama-3.1 model asked for a
    new theta under `type: llama3` keeps its factor and frequency bands). A change of
    type that would drop a scaling the model already has is refused unless
    `rope.replace_scaling` is set. `target` is the new max_position_embeddings; a factor
    that is neither set nor already the model's is derived as target / original window.
    """
    current = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in current:
        raise RopeError(
            f"model type {config.model_type!r} has no RoPE parameters (config.rope_parameters "
            "holds no rope_theta): RoPE settings cannot be applied to it"
        )
    if rope is None:
        return current
    old_type = current.get("rope_type", "default")
    params = dict(current)
    if rope.type != old_type:
        if old_type != "default" and not rope.replace_scaling:
            kept = {k: v for k, v in current.items() if k in SCALING_KEYS}
            raise RopeError(
                f"rope.type {rope.type!r} would drop the model's {old_type!r} RoPE scaling "
                f"({kept}): set rope.type: {old_type} to change its settings (theta, factor), "
                "or rope.replace_scaling: true to replace it"
            )
        params = {k: v for k, v in current.items() if k not in SCALING_KEYS}
    params["rope_type"] = rope.type
    if rope.theta is not None:
        params["rope_theta"] = float(rope.theta)
    if rope.type == "default":
        return params
    original = rope.original_max_position_embeddings or _base_window(config, current)
    if rope.factor is not None:
        factor = float(rope.factor)
    elif "factor" in params:
        factor = float(params["factor"])  # the model's own scaling, kept
    else:
        factor = target / original
    if factor < 1.0:
        raise RopeError(
            f"rope.factor {factor:g} is below 1 (target {target}, original window {original}): "
            "scaling would shrink the window"
        )
    params["factor"] = factor
    if rope.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if rope.type == "llama3":
        for name, default in _LLAMA3_DEFAULTS.items():
            value = getattr(rope, name)
            params[name] = float(value) if value is not None else params.get(name, default)
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise RopeError("rope.high_freq_factor must be above rope.low_freq_factor")
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


def _base_window(config: Any, params: dict[str, Any]) -> int:
    # a model already scaled (e.g. Llama-3.1's llama3 RoPE) keeps its pre-training window
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)
