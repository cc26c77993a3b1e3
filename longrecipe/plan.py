"""`longrecipe plan`: what each training stage of a recipe will cost, before it runs.

From the config and the model's shape only (longrecipe.model_shape: no weights are
read), for every stage that trains the base model (the analysis's H', train, anneal):
parameters, tokens per step, FLOPs per step and per stage (6N + 6 L n_layers d per
token, shared/REFERENCE.md "Cost"), hours at a stated MFU, and the memory of one device split into weights, gradients, optimizer states, activations
and logits under the stage's precision, sharding (one process or DDP, FSDP, DeepSpeed
ZeRO-3) and CPU offload; whether it fits, and which setting to change if not.

Memory model (bytes; P parameters, n processes sharing the shards, T tokens of one
micro-batch, d hidden, i intermediate, kv the key/value width, V vocabulary):

- weights: fp32 master weights 4P, plus under bf16 autocast the bf16 copies autocast
  keeps for backward (2P). FSDP / ZeRO-3 hold 4P/n (FSDP) or 2P/n + 4P/n master (ZeRO-3)
  plus the parameters gathered for the layer being computed and the next (2 layers and,
  at the root, the embedding and output head, in bf16); offload moves the shards to the
  CPU and leaves the gathered working set on the GPU.
- gradients: 4P (2P/n under ZeRO-3 bf16, 4P/n under FSDP); offloaded with the optimizer.
- optimizer: AdamW's two fp32 moments, 8P (/n when sharded); on the CPU when offloaded.
- activations per layer and token, from the tensors a Llama layer saves for backward:
  two RMSNorms in fp32 (8d each), the attention inputs, q/k/v, their rotary copies, the
  attention output and o_proj input, the MLP inputs and four tensors of width i, all in
  the compute dtype; eager attention adds h x T x 6 bytes of scores. With activation
  checkpointing each layer keeps only its input (d in the residual dtype) and one layer
  is recomputed at a time.
- logits: T x V x (2a + 12) bytes for the plain loss (logits, their fp32 copy,
  log-softmax, gradients); the chunked loss needs the same for loss_chunk_tokens rows.

Peak = the larger of the backward pass (weights, optimizer, activations, logits and
the embedding's gradient) and the optimizer step (weights, gradients, optimizer, and
AdamW's temporary of 4P on a GPU). Checked against peak memory measured on this
machine's CPU for the tiny and demo models (tests/test_plan.py, bench/bench_plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from longrecipe.config import OptimConfig, PipelineConfig
from longrecipe.launch import accelerate_file, distributed_kind, resolve_processes
from longrecipe.model_shape import ModelShape, read_shape

GB = 1e9


@dataclass(frozen=True)
class Setup:
    """How a stage computes: what the memory of one device depends on."""

    sharding: str  # "none" (one process or DDP), "fsdp", "zero3"
    processes: int
    precision: str  # "bf16" or "fp32"
    checkpointing: bool
    offload_params: bool = False
    offload_optimizer: bool = False
    micro_batch: int = 1
    chunk: int = 1024
    attention: str = "sdpa"
    device: str = "cuda"

    def describe(self) -> str:
        what = {"none": "one process" if self.processes == 1 else f"DDP x{self.processes}",
                "fsdp": f"FSDP x{self.processes}", "zero3": f"ZeRO-3 x{self.processes}"}[self.sharding]
        off = [n for n, on in (("params", self.offload_params), ("optimizer", self.offload_optimizer)) if on]
        return (f"{what}, {self.precision}, checkpointing {'on' if self.checkpointing else 'off'}"
                + (f", CPU offload of {' and '.join(off)}" if off else ""))


@dataclass
class StagePlan:
    stage: str
    shape: ModelShape
    setup: Setup
    sample_tokens: int
    global_batch: int
    steps: int
    memory: dict[str, float]  # bytes on one device, by part
    alternatives: dict[str, float]  # activations/logits of the settings not chosen
    cpu_bytes: float
    peak: float
    gpu_memory: float
    flops_per_step: float
    hours: float
    advice: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.sample_tokens


def setup_for(optim: OptimConfig, gpus: int | None = None, device: str = "cuda") -> Setup:
    """The stage's Setup from its optim section and accelerate file."""
    processes = gpus or resolve_processes(optim.num_processes, optim.accelerate_config)
    kind = distributed_kind(optim.accelerate_config)
    ds = accelerate_file(optim.accelerate_config).get("deepspeed_config", {}) or {}
    fsdp = accelerate_file(optim.accelerate_config).get("fsdp_config", {}) or {}
    sharding = {"deepspeed": "zero3" if int(ds.get("zero_stage", 3)) == 3 else "none",
                "fsdp": "fsdp"}.get(kind, "none")
    return Setup(
        sharding=sharding, processes=processes, precision=optim.precision,
        checkpointing=optim.gradient_checkpointing,
        offload_params=str(ds.get("offload_param_device", "none")) == "cpu"
        or bool(fsdp.get("fsdp_offload_params", False)),
        offload_optimizer=str(ds.get("offload_optimizer_device", "none")) == "cpu"
        or bool(fsdp.get("fsdp_offload_params", False)),
        micro_batch=optim.batch_size, chunk=optim.loss_chunk_tokens,
        attention="eager" if optim.attention == "eager" else "sdpa", device=device,
    )


# --------------------------------------------------------------------------- memory


def activation_bytes(s: ModelShape, setup: Setup, tokens: int, checkpointing: bool) -> tuple[float, float]:
    """(kept, working): activations kept for backward for one micro-batch of `tokens`
    tokens, and what a layer's backward adds on top (its gradients; with checkpointing
    also the layer recomputed)."""
    a = 2 if setup.precision == "bf16" else 4  # matmul outputs (autocast or bf16 params)
    r = 2 if setup.precision == "bf16" and setup.sharding != "none" else 4  # residual stream
    d, kv, i = s.hidden, s.kv_dim, s.intermediate
    # per token: each RMSNorm keeps its input and its fp32 normalised value; the linear
    # inputs are the norm outputs (same dtype) or one autocast cast per projection (3 + 2)
    norms = 2 * (r * d + 4 * d) + (2 * a * d if a == r else 5 * a * d)
    attention = 2 * a * d + 2 * a * kv  # rotated q, attention output; rotated k, v
    if setup.attention == "eager":
        attention += s.heads * tokens * (4 if a == 4 else 4 + a)  # fp32 softmax (+ its cast)
    layer = (norms + attention + 4 * a * i) * tokens  # gate, silu(gate), up, their product
    outside = tokens * d * (r + 4 + r)  # final norm (input, normalised) and its output
    working = 2 * a * i * tokens  # gradients in flight inside a layer's backward
    if checkpointing:
        return s.layers * tokens * d * r + outside, layer + working
    return s.layers * layer + outside, working


def logits_bytes(s: ModelShape, setup: Setup, tokens: int, chunked: bool) -> float:
    a = 2 if setup.precision == "bf16" else 4
    rows = min(tokens, setup.chunk) if chunked else tokens
    return rows * s.vocab * (2 * a + 12)


def device_memory(s: ModelShape, setup: Setup, tokens: int) -> tuple[dict[str, float], float, float]:
    """(parts, peak, cpu bytes) on one device for a micro-batch of `tokens` tokens."""
    p, n = s.params, setup.processes
    bf16 = setup.precision == "bf16"
    gathered = 2 * max(s.layer_params, s.embedding_params) * (2 if bf16 else 4)
    cpu = 0.0
    if setup.sharding == "none":
        weights = 4 * p + (2 * p if bf16 else 0)
        grads, optim = 4 * p, 8 * p
    elif setup.sharding == "fsdp":
        weights, grads, optim = 4 * p / n, 4 * p / n, 8 * p / n
        if setup.offload_params:
            cpu += weights + grads + optim
            weights, grads, optim = 0.0, 0.0, 0.0
        weights += gathered
    else:  # zero3: bf16 (or fp32) params and grads partitioned; fp32 master + moments
        wb = 2 if bf16 else 4
        weights, grads, optim = wb * p / n, wb * p / n, (12 if bf16 else 8) * p / n
        if setup.offload_optimizer:
            cpu += optim + 4 * p / n  # CPU Adam keeps fp32 gradients beside the moments
            optim, grads = 0.0, 0.0
        if setup.offload_params:
            cpu += weights
            weights = 0.0
        weights += gathered
    kept, working = activation_bytes(s, setup, tokens, setup.checkpointing)
    logit = logits_bytes(s, setup, tokens, chunked=True)
    embed_grad = 4 * s.embedding_params / (n if setup.sharding != "none" else 1)
    if setup.sharding != "none" and setup.offload_optimizer:
        embed_grad = 0.0
    adam_temp = 4 * p / (n if setup.sharding != "none" else 1) if setup.device == "cuda" else 0.0
    if setup.offload_optimizer:
        adam_temp = 0.0
    # the loss's backward runs first, with every activation kept; a layer's backward later
    backward = weights + optim + kept + embed_grad + max(logit, working)
    step = weights + grads + optim + adam_temp
    parts = {"weights": weights, "gradients": grads, "optimizer": optim,
             "activations": kept + working, "logits": logit}
    return parts, max(backward, step), cpu


# --------------------------------------------------------------------------- the plan


def plan_stage(stage: str, shape: ModelShape, optim: OptimConfig, sample_tokens: int, *,
               gpu_memory: float, gpus: int | None, mfu: float, peak_tflops: float,
               device: str = "cuda") -> StagePlan:
    setup = setup_for(optim, gpus, device)
    tokens = setup.micro_batch * sample_tokens
    parts, peak, cpu = device_memory(shape, setup, tokens)
    other = {
        "activations, checkpointing " + ("off" if setup.checkpointing else "on"):
            sum(activation_bytes(shape, setup, tokens, not setup.checkpointing)),
        "logits, full (no chunks)": logits_bytes(shape, setup, tokens, chunked=False),
    }
    per_token = 6 * shape.params + 6 * sample_tokens * shape.layers * shape.hidden
    flops_step = optim.global_batch * sample_tokens * per_token
    seconds = flops_step * optim.max_steps / (setup.processes * peak_tflops * 1e12 * mfu)
    plan = StagePlan(stage, shape, setup, sample_tokens, optim.global_batch, optim.max_steps, parts,
                     other, cpu, peak, gpu_memory, flops_step, seconds / 3600)
    if not plan.fits:
        plan.advice = advice(stage, shape, setup, tokens, gpu_memory)
    return plan


def advice(stage: str, shape: ModelShape, setup: Setup, tokens: int, gpu_memory: float) -> list[str]:
    """The first changes (in this order) that make the stage fit."""
    ds = "configs/accelerate/deepspeed-zero3-offload.yaml"
    tries = [
        (f"--set {stage}.optim.gradient_checkpointing=true", replace(setup, checkpointing=True)),
        (f"--set {stage}.optim.accelerate_config={ds} (ZeRO-3, CPU offload)",
         replace(setup, sharding="zero3", offload_params=True, offload_optimizer=True)),
        ("both of the above", replace(setup, checkpointing=True, sharding="zero3",
                                       offload_params=True, offload_optimizer=True)),
    ]
    if setup.micro_batch > 1:
        tries.append((f"--set {stage}.optim.batch_size=1 (raise grad_accum to keep the batch)",
                      replace(setup, micro_batch=1, checkpointing=True, sharding="zero3",
                              offload_params=True, offload_optimizer=True)))
    for text, alt in tries:
        t = tokens // setup.micro_batch * alt.micro_batch
        if device_memory(shape, alt, t)[1] <= gpu_memory:
            return [text]
    return ["no single setting fits: shorten the samples (the stage's build.train_len or anneal.train_len) "
            "or add GPUs (--gpus) with a sharded accelerate config"]


def plan_recipe(cfg: PipelineConfig, *, gpu_memory: float | None = None, gpus: int | None = None,
         mfu: float | None = None, peak_tflops: float | None = None,
         model_config: str | None = None, device: str = "cuda") -> list[StagePlan]:
    """One StagePlan per stage that trains the base model: the analysis's H' (when
    analyze.reference_training makes it), train and anneal; config only."""
    p = cfg.plan
    shape = read_shape(cfg.model, model_config, fallback=p.model_shape)
    kw = dict(gpu_memory=(gpu_memory or p.gpu_memory_gb * GB), gpus=gpus or p.gpus,
              mfu=mfu or p.mfu, peak_tflops=peak_tflops or p.peak_tflops, device=device)
    plans = []
    ref = cfg.analyze.reference_training if cfg.analyze.method == "logit_delta" else None
    if ref is not None:
        plans.append(plan_stage("analyze.reference_training.train", shape, ref.train.optim,
                                _sample_len(ref.build), **kw))
    plans += [plan_stage("train", shape, cfg.train.optim, _sample_len(cfg.build), **kw),
              plan_stage("anneal", shape, cfg.anneal.optim, cfg.anneal.train_len, **kw)]
    return plans


def _sample_len(build) -> int:
    return build.target_len if build.method == "full" else build.train_len


def format_plan(plans: list[StagePlan], mfu: float, peak_tflops: float) -> str:
    s = plans[0].shape
    lines = [f"model: {s.params / 1e9:.2f}B parameters (hidden {s.hidden}, {s.layers} layers, "
             f"{s.heads} heads / {s.kv_heads} kv, vocabulary {s.vocab:,}; from {s.source})"]
    for p in plans:
        mem = "  ".join(f"{k} {v / GB:.1f}" for k, v in p.memory.items())
        alt = "; ".join(f"{k} {v / GB:.1f}" for k, v in p.alternatives.items())
        lines += [
            "",
            f"{p.stage}: {p.setup.describe()}",
            f"  tokens: {p.sample_tokens:,} per sample x {p.global_batch} per step = "
            f"{p.tokens_per_step:,} per step, {p.steps} steps ({p.tokens_per_step * p.steps / 1e6:,.1f}M)",
            f"  FLOPs: {p.flops_per_step:.3g} per step, {p.flops_per_step * p.steps:.3g} for the stage;"
            f" {_duration(p.hours)} on {p.setup.processes} GPU(s) at {mfu:.0%} MFU of {peak_tflops:.0f} TFLOP/s",
            f"  memory per GPU (GB): {mem}",
            f"  instead: {alt}",
            f"  peak {p.peak / GB:.1f} GB of {p.gpu_memory / GB:.0f} GB: "
            + ("fits" if p.fits else "DOES NOT FIT")
            + (f"; CPU memory for offloaded state {p.cpu_bytes / GB:.1f} GB" if p.cpu_bytes else ""),
        ]
        lines += [f"  to fit: {a}" for a in p.advice]
    return "\n".join(lines)


def _duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.2g} s"
