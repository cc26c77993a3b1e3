"""How much stage-0 training each method of a comparison gets.

The paper compares methods at the same number of samples and optimizer steps (our
default). A user has a compute budget instead, so `compare.flops_of: <method>` gives
every method the training FLOPs of that method at train.optim.max_steps: full-length
training given LongRecipe's FLOPs trains fewer steps, LongRecipe given full-length's
trains more. `compare.steps` sets a method's steps by hand. Whenever a method's steps
change, its number of samples changes with them (`build.num_samples` x steps /
max_steps, rounded up), so every method still sees each of its samples once.

FLOPs per step follow the report's estimate (REFERENCE.md): per token
6N + 6 x L x n_layers x d_model for N parameters at sample length L, times the
tokens of a step (global batch x L). Full-length samples are build.target_len long,
every other method's build.train_len.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from longrecipe.config import PipelineConfig
from longrecipe.model_shape import ModelShape, read_shape


@dataclass(frozen=True)
class MethodBudget:
    """One method's share of a comparison."""

    method: str
    steps: int
    """Optimizer steps of its stage-0 training."""
    num_samples: int
    """Samples its build makes."""
    sample_len: int
    flops: float
    """Estimated training FLOPs of those steps."""


def sample_len(cfg: PipelineConfig, method: str) -> int:
    return cfg.build.target_len if method == "full" else cfg.build.train_len


def step_flops(shape: ModelShape, global_batch: int, length: int) -> float:
    """Training FLOPs of one optimizer step on samples of `length` tokens."""
    per_token = 6.0 * shape.params + 6.0 * length * shape.layers * shape.hidden
    return global_batch * length * per_token


def method_budgets(cfg: PipelineConfig, shape: ModelShape | None = None) -> dict[str, MethodBudget]:
    """Steps, samples and FLOPs of every method in compare.methods."""
    c, optim = cfg.compare, cfg.train.optim
    shape = shape or read_shape(cfg.model)
    per_step = {m: step_flops(shape, optim.global_batch, sample_len(cfg, m)) for m in c.methods}
    ref = c.flops_of
    if ref is not None and ref not in per_step:  # the reference need not be compared itself
        per_step[ref] = step_flops(shape, optim.global_batch, sample_len(cfg, ref))
    out = {}
    for m in c.methods:
        if m in c.steps:
            steps = c.steps[m]
        elif ref is not None:
            steps = max(1, round(optim.max_steps * per_step[ref] / per_step[m]))
        else:
            steps = optim.max_steps
        samples = cfg.build.num_samples
        if samples is not None and steps != optim.max_steps:
            samples = max(1, math.ceil(samples * steps / optim.max_steps))
        out[m] = MethodBudget(m, steps, samples, sample_len(cfg, m), per_step[m] * steps)
    return out


def method_config(cfg: PipelineConfig, method: str, budget: MethodBudget) -> PipelineConfig:
    """The recipe one method's branch runs: its build method, samples and steps."""
    from longrecipe.config import OptimConfig

    build = cfg.build.model_copy(update={"method": method, "num_samples": budget.num_samples})
    train = cfg.train
    if budget.steps != cfg.train.optim.max_steps:
        o = cfg.train.optim
        # warmup stays as set, within the new step count (validated again)
        optim = OptimConfig.model_validate({**o.model_dump(), "max_steps": budget.steps,
                                            "warmup_steps": min(o.warmup_steps, budget.steps - 1)})
        train = cfg.train.model_copy(update={"optim": optim})
    return cfg.model_copy(update={"build": build, "train": train})
