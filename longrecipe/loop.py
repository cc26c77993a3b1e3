"""The training loop shared by `train` and `anneal`: load the model for the device it
trains on, fit it on a `samples` artifact, save a Hugging Face folder and one
`train_metrics` row per optimizer step.

One optimizer step is the global batch, batch_size x grad_accum samples, whatever the
number of processes: with N processes, process r runs micro-batches r*k .. r*k + k - 1
of the step (k = grad_accum / N). Every process reads the same seeded sample order
(longrecipe.batches.SampleStream), so the N processes together see exactly the samples
one process would.

The loss is exact by construction (the construction torchtune uses): each
micro-batch contributes its summed token NLL divided by the label-token count of the
whole global batch, counted on every process and all-reduced before any backward; the
backward is scaled by k x N, which undoes accelerate's division by the accumulation
steps and the averaging of gradients over processes (DDP, FSDP, DeepSpeed). So samples
of unequal length across processes weigh exactly as in one process.

Logits never exist for a whole sequence: the decoder's last hidden states go through
the output head and cross-entropy in chunks (longrecipe.loss).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from longrecipe.artifacts import ArtifactRef, StageWriter
from longrecipe.batches import VARLEN_ATTENTION, Sample, SampleStream, TrainError, collate
from longrecipe.checkpoints import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    sharded,
)
from longrecipe.config import OptimConfig, RopeConfig, RuntimeConfig
from longrecipe.distributed import configure_deepspeed, is_deepspeed, make_accelerator
from longrecipe.model_io import (
    activation_checkpointing,
    pad_id,
    quiet_transformers,
    save_model_folder,
    torch_threads,
)
from longrecipe.models import ModelSource, load_model, load_tokenizer, pick_attention
from longrecipe.progress import progress_bar

METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int32()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("tokens", pa.int64()),
        ("tokens_per_s", pa.float64()),
        ("elapsed_s", pa.float64()),
        ("max_position", pa.int32()),
    ]
)

MODEL_DIR = "files/model"


def train_model(
    src: ModelSource,
    samples: ArtifactRef,
    optim: OptimConfig,
    w: StageWriter,
    runtime: RuntimeConfig,
    *,
    rope: RopeConfig | None,
    target: int | None,
    save_dtype: str,
    label: str,
    launched: bool = False,
    weights=None,
) -> None:
    """Load, (re)configure RoPE, fit, save the HF folder and metrics: the body of train and
    anneal. `weights` (longrecipe.token_weights.TokenWeights): LongCE loss weights."""
    from longrecipe.rope import apply_rope

    with torch_threads(runtime.threads), quiet_transformers():
        acc = make_accelerator(runtime, optim, project_dir=str(w.local_dir / "files"))
        model, attention = load_for_training(src, optim.attention, acc.device.type)
        window = model.config.max_position_embeddings
        if target is not None:
            check_target(target, window)
        rope_params = apply_rope(model, rope, target, training=True)
        result = fit(model, samples, optim, w, runtime, acc, label=label, attention=attention,
                     weights=weights)
        # gathering a sharded model is collective: every process takes part
        full_state = acc.get_state_dict(result.model) if sharded(acc) else None
        if acc.is_main_process:
            save_model_folder(acc.unwrap_model(result.model), load_tokenizer(src),
                              w.local_dir / MODEL_DIR, save_dtype, full_state)
            w.write_table("train_metrics", pa.Table.from_pylist(result.metrics, METRICS_SCHEMA))
        w.info.update(
            label=label,
            base_model=src.key,
            base_window=window,
            max_position_embeddings=model.config.max_position_embeddings,
            rope_parameters=rope_params,
            attention=attention,
            device=acc.device.type,
            num_processes=acc.num_processes,
            distributed=acc.distributed_type.value,
            global_batch=optim.global_batch,
            launched=launched,
            steps=len(result.metrics),
            tokens=result.metrics[-1]["tokens"] if result.metrics else 0,
            final_loss=result.metrics[-1]["loss"] if result.metrics else None,
            lr_after_last_step=result.final_lr,
            resumed_from_step=result.resumed_from,
            max_position_seen=max((m["max_position"] for m in result.metrics), default=0),
        )
        if weights is not None:
            # LongCE: what share of the weighted tokens had a score, and the mean weight
            w.info.update(loss_weights_coverage=round(weights.coverage, 6),
                          loss_weight_mean=round(result.weight_mean, 6))
        acc.end_training()


def load_for_training(src: ModelSource, requested: str, device: str):
    """The attention backend resolved once, for the device the model trains on, and the
    model loaded on the CPU with it (accelerate moves it): (model, attention)."""
    import torch

    attention = pick_attention(requested, device)
    model = load_model(src, dtype=torch.float32, device="cpu", attention=attention)
    # what the model really runs: a class without an sdpa path falls back to eager
    return model, getattr(model.config, "_attn_implementation", None) or attention


def check_target(target: int, base: int | None) -> None:
    if base is not None and target < base:
        raise TrainError(
            f"train target window {target} (train.max_position_embeddings or "
            f"build.target_len) is shorter than the model's window {base}: "
            "context extension needs a target at least as long"
        )


@dataclass
class FitResult:
    model: Any
    metrics: list[dict]
    final_lr: float
    resumed_from: int = 0
    weight_mean: float = 1.0
    """Mean loss weight over the label tokens of this process's steps (1 without weights)."""


def fit(model, samples: ArtifactRef, optim: OptimConfig, w: StageWriter, runtime: RuntimeConfig,
        acc, *, label: str = "train", attention: str = "sdpa", weights=None) -> FitResult:
    """The training loop. Returns the (prepared) model and one metrics row per optimizer step."""
    import torch

    from longrecipe.head import forward_hidden, output_head
    from longrecipe.loss import chunked_nll_sum

    torch.manual_seed(optim.seed)
    stream = SampleStream(samples, optim.seed, weights)
    weight_sum, weight_labels = torch.zeros((), dtype=torch.float64), 0  # read once at the end
    model.train()
    model.config.use_cache = False
    if optim.gradient_checkpointing:
        activation_checkpointing(model, True)
    head, decoder = output_head(model), model.get_decoder()  # checked before any wrapping
    opt = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    world, rank = acc.num_processes, acc.process_index
    local = optim.per_process_accum(world)
    if is_deepspeed(acc):
        configure_deepspeed(acc.state.deepspeed_plugin, optim, world)
    model, opt = acc.prepare(model, opt)
    # the scheduler is stepped by us once per optimizer step (accelerate's wrapper would
    # step it once per process) and checkpointed by us (scheduler.json)
    sched = make_schedule(opt, optim)
    inner = acc.unwrap_model(model)
    window = inner.config.max_position_embeddings
    pad = pad_id(inner)
    autocast = optim.precision == "bf16" and acc.mixed_precision == "no"
    max_norm = optim.max_grad_norm or math.inf
    packed = attention in VARLEN_ATTENTION

    state = TrainState()
    ckpt = latest_checkpoint(w.scratch)
    if ckpt is not None:
        state = load_checkpoint(ckpt, acc, model, opt, sched)
    resumed_from = state.step
    params = [p for p in model.parameters() if p.requires_grad]

    show = runtime.progress and acc.is_main_process
    with progress_bar(label, show, unit="steps", total=optim.max_steps) as bar:
        bar.advance(state.step)
        while state.step < optim.max_steps:
            started = time.perf_counter()
            micro = [stream.take(state.position + (rank * local + j) * optim.batch_size,
                                 optim.batch_size) for j in range(local)]
            state.position += optim.global_batch
            check_window(micro, window, samples)
            batches = [collate(m, pad, acc.device, packed=packed) for m in micro]
            counts = _sum(acc, torch.tensor([sum(b.n_labels for b in batches),
                                             sum(b.n_tokens for b in batches)], device=acc.device))
            n_labels, step_tokens = max(int(counts[0]), 1), int(counts[1])
            scale = local * world / n_labels
            nll_sum = torch.zeros((), device=acc.device)
            for b in batches:
                # accumulate(): no gradient sync (DDP) and no DeepSpeed step before the
                # last micro-batch of this process
                with acc.accumulate(model):
                    with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=autocast):
                        hidden = forward_hidden(model, b.input_ids, b.position_ids, b.attention_mask,
                                                decoder=decoder, **b.kwargs)
                        nll = chunked_nll_sum(hidden, b.targets, head, optim.loss_chunk_tokens,
                                              b.weights)
                    acc.backward(nll * scale)
                nll_sum += nll.detach()
                if b.weights is not None:
                    weight_sum = weight_sum.to(b.weights.device) + b.weights.sum().double()
                    weight_labels += b.n_labels
            assert acc.sync_gradients, "micro-batches out of step with gradient accumulation"
            grad_norm = acc.clip_grad_norm_(params, max_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

            loss = float(_sum(acc, nll_sum.reshape(1))[0]) / n_labels
            max_pos = _max(acc, max(b.max_position for b in batches))
            seconds = time.perf_counter() - started
            state.step += 1
            state.elapsed += seconds
            state.tokens += step_tokens
            row = {
                "step": state.step,
                "loss": loss,
                "lr": float(lr),
                "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                "tokens": state.tokens,
                "tokens_per_s": step_tokens / seconds if seconds > 0 else 0.0,
                "elapsed_s": state.elapsed,
                "max_position": max_pos,
            }
            state.metrics.append(row)
            if acc.trackers:
                acc.log({f"{label}/{k}": v for k, v in row.items() if k != "step"}, step=state.step)
            bar.advance(1)
            bar.note(f"loss {loss:.4f} lr {lr:.1e} {row['tokens_per_s']:,.0f} tok/s")
            every = optim.checkpoint_every
            if every and state.step % every == 0 and state.step < optim.max_steps:
                save_checkpoint(w.scratch, state, acc, model, opt, sched)
            if runtime.kill_at_step == state.step and acc.is_main_process:
                os.kill(os.getpid(), signal.SIGKILL)  # testing aid: a hard kill mid-run
    return FitResult(model, state.metrics, float(sched.get_last_lr()[0]), resumed_from,
                     float(weight_sum) / weight_labels if weight_labels else 1.0)


def check_window(micro: list[list[Sample]], window: int, samples: ArtifactRef) -> None:
    for s in (s for b in micro for s in b):
        if int(s.position_ids.max()) >= window:
            raise TrainError(
                f"{samples.stage}/{samples.key}: sample {s.sample_id!r} has position id "
                f"{int(s.position_ids.max())} >= the model's max_position_embeddings {window}"
            )


def _sum(acc, t):
    return acc.reduce(t, "sum") if acc.num_processes > 1 else t


def _max(acc, value: int) -> int:
    if acc.num_processes == 1:
        return value
    import torch

    return int(acc.gather(torch.tensor([value], device=acc.device)).max())


def causal_lm_forward(model, input_ids, position_ids, attention_mask=None, **kwargs):
    """One scoring forward with logits: explicit position ids, an explicit attention mask
    (all ones when none is given) and no KV cache.

    The mask is what keeps attention fully causal: with gapped position ids, no mask
    and no cache, transformers treats every gap as the start of a new packed
    sequence and attention becomes block-diagonal, silently.
    """
    import torch

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=False,
        **kwargs,
    )


def make_schedule(opt, optim: OptimConfig):
    """Warmup then constant, cosine to zero or linear to zero (transformers' schedules).

    The learning rate used at step k (1-based) is the schedule after k - 1 steps, so
    the schedule reaches exactly zero after the last step.
    """
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if optim.schedule == "constant":
        return get_constant_schedule_with_warmup(opt, optim.warmup_steps)
    make = get_cosine_schedule_with_warmup if optim.schedule == "cosine" else get_linear_schedule_with_warmup
    return make(opt, optim.warmup_steps, optim.max_steps)


# --------------------------------------------------------------------------- processes


def needs_launch(optim: OptimConfig, runtime: RuntimeConfig | None = None) -> bool:
    """More than one process, an accelerate config file, or a run that keeps each training
    in its own process (runtime.isolated): run under `accelerate launch`."""
    return ((optim.num_processes or 1) > 1 or optim.accelerate_config is not None
            or (runtime is not None and runtime.isolated))


def launch_training(spec, cfg, inputs: dict, store, runtime: RuntimeConfig) -> ArtifactRef:
    """Run a training stage (train, anneal) under `accelerate launch` with the processes,
    accelerate file and precision of its `optim` section."""
    from longrecipe.launch import launch, resolve_processes

    optim = cfg.optim
    processes = resolve_processes(optim.num_processes, optim.accelerate_config)
    try:
        optim.per_process_accum(processes)
    except ValueError as e:
        raise TrainError(f"{spec.stage}: {e}") from None
    return launch(spec, cfg, inputs, store, runtime, processes=processes,
                  accelerate_config=optim.accelerate_config,
                  mixed_precision="bf16" if optim.precision == "bf16" else "no")
