"""What only a CUDA GPU shows about training (issue 12), in three parts, each printing
its own table; run by bench/gpu.sh. `--dry-run` runs the same code on the CPU with
tiny shapes (it checks the script, not the figures).

1. correctness: a random Llama trains a few steps on LongRecipe position ids with sdpa
   and with flex_attention in bf16 autocast, each against an fp32 eager reference from
   the same weights and batch: loss and gradient relative error (step 1), and the
   losses of the following steps.
2. throughput: a random 1B-shaped Llama (hidden 2048, 16 layers, 32 heads / 8 kv,
   intermediate 8192, 128k vocabulary) through our loop (`fit`: bf16 autocast, fp32
   master weights, activation checkpointing, chunked loss) at 16k and 32k tokens per
   step: tokens/s, MFU against --peak-tflops (788), peak memory; and a LongRecipe step
   (micro-batch of 3 samples of T/3 tokens, positions spread over T) against a full
   step (one sample of T tokens), same tokens: measured cost ratio over FLOP ratio.
3. length: an 8B-shaped Llama (hidden 4096, 32 layers, 8 kv heads, 14336, 128k
   vocabulary) with the best single-GPU setup torch gives here (FSDP2 with CPU offload
   of parameters, gradients and optimizer, bf16 compute, activation checkpointing,
   chunked loss): one training step at 8k, 16k, 32k, ... tokens until CUDA runs out of
   memory; the longest that trained, beside what `longrecipe plan` predicts. SGD on
   the CPU instead of AdamW: AdamW's 64 GB of moments do not fit the host's 128 GB
   beside fp32 parameters and gradients (the GPU's memory, what limits the length,
   does not depend on it under offload).

    python bench/bench_gpu_train.py [--parts correctness,throughput,length] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


def llama(shape: dict, window: int, attention: str, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=window, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    config._attn_implementation = attention
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config)


def longrecipe_positions(n: int, target: int, rng) -> np.ndarray:
    """Sentences of ~20 tokens, contiguous inside, random gaps between (positions < target)."""
    cuts = np.sort(rng.choice(np.arange(1, n), max(n // 20, 1), replace=False))
    gaps = rng.multinomial(target - n, np.ones(len(cuts)) / len(cuts))
    return np.arange(n) + np.concatenate([[0], np.cumsum(gaps)])[np.searchsorted(cuts, np.arange(n), side="right")]


def flops_per_token(n_params: float, length: int, layers: int, d: int) -> float:
    return 6 * n_params + 6 * length * layers * d


# --------------------------------------------------------------------------- 1. correctness


def correctness(args) -> None:
    from longrecipe.batches import Sample, collate
    from longrecipe.head import forward_hidden, output_head
    from longrecipe.loss import chunked_nll_sum

    shape = TINY if args.dry_run else dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                           num_attention_heads=8, num_key_value_heads=4, vocab_size=32000)
    n, target = (128, 512) if args.dry_run else (2048, 8192)
    rng = np.random.default_rng(0)
    samples = [Sample(i, rng.integers(0, shape["vocab_size"], n), longrecipe_positions(n, target, rng))
               for i in range(4)]
    backends = ["sdpa"] if args.dry_run else ["sdpa", "flex_attention"]

    def run(attention: str, dtype_autocast: bool, steps: int = 3):
        model = llama(shape, target, attention, args.device).train()
        head = output_head(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses, grads = [], None
        for k in range(steps):
            b = collate(samples[k % len(samples):k % len(samples) + 1], 0, args.device)
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=dtype_autocast):
                h = forward_hidden(model, b.input_ids, b.position_ids, b.attention_mask)
                loss = chunked_nll_sum(h, b.targets, head, 1024) / b.n_labels
            loss.backward()
            if k == 0:
                grads = {name: p.grad.float().clone() for name, p in model.named_parameters()}
            losses.append(loss.item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        return losses, grads

    ref_losses, ref_grads = run("eager", False)
    print(f"\n1. correctness: {n}-token LongRecipe samples (positions over {target}), bf16 autocast vs fp32 eager")
    print(f"   {'backend':16s} {'loss rel err (step 1)':>22s} {'grad rel err (step 1)':>22s}  losses steps 1..3")
    print(f"   {'eager fp32':16s} {'-':>22s} {'-':>22s}  {', '.join(f'{x:.4f}' for x in ref_losses)}")
    for attention in backends:
        try:
            losses, grads = run(attention, True)
        except Exception as e:  # report, do not hide: a backend transformers lacks for the model
            print(f"   {attention:16s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        num = sum(float((grads[k] - ref_grads[k]).norm() ** 2) for k in grads) ** 0.5
        den = sum(float(ref_grads[k].norm() ** 2) for k in grads) ** 0.5
        print(f"   {attention:16s} {abs(losses[0] - ref_losses[0]) / ref_losses[0]:22.2e} {num / den:22.2e}  "
              f"{', '.join(f'{x:.4f}' for x in losses)}")


# --------------------------------------------------------------------------- 2. throughput


def _fit_seconds(model, rows, optim, device) -> tuple[float, list[dict]]:
    """Seconds per step (steps after the first) of our loop on these sample rows."""
    import pyarrow as pa

    from longrecipe import ArtifactStore, RuntimeConfig, StageSpec
    from longrecipe.distributed import make_accelerator
    from longrecipe.loop import fit

    runtime = RuntimeConfig(progress=False, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        ref = store.produce(StageSpec("build", "bench_v1", {"n": len(rows), "t": time.time_ns()}, {}),
                            lambda w: w.write_table("samples", pa.Table.from_pylist(rows)))
        out = {}

        def body(w):
            out["m"] = fit(model, ref, optim, w, runtime, make_accelerator(runtime, optim),
                           attention=model.config._attn_implementation).metrics
            raise _Done

        try:
            store.produce(StageSpec("bench", "bench_v1", {"t": time.time_ns()}, {}), body)
        except _Done:
            pass
    m = out["m"]
    return (m[-1]["elapsed_s"] - m[0]["elapsed_s"]) / (len(m) - 1), m


class _Done(Exception):
    pass


def throughput(args) -> None:
    from longrecipe import OptimConfig

    shape = TINY if args.dry_run else LLAMA_1B
    lengths = [512, 1024] if args.dry_run else [16384, 32768]
    attention = "sdpa"
    rng = np.random.default_rng(1)
    print(f"\n2. throughput: random Llama {shape}, bf16 autocast + fp32 master weights, activation "
          f"checkpointing, chunked loss, {attention}, peak {args.peak_tflops:.0f} TFLOP/s")
    print(f"   {'step':28s} {'s/step':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GB':>8s}")
    n_params = model_shape(shape).params
    for T in lengths:
        optim = OptimConfig(lr=1e-5, max_steps=3, precision="bf16", gradient_checkpointing=True,
                            max_grad_norm=1.0)
        full = [{"sample_id": i, "input_ids": rng.integers(0, shape["vocab_size"], T).tolist(),
                 "position_ids": list(range(T))} for i in range(3)]
        k = 3
        short = T // k
        lr_rows = [{"sample_id": i, "input_ids": rng.integers(0, shape["vocab_size"], short).tolist(),
                    "position_ids": longrecipe_positions(short, T, rng).tolist()} for i in range(3 * k)]
        results = {}
        for name, rows, opt in (("full", full, optim),
                                ("longrecipe", lr_rows, optim.model_copy(update={"batch_size": k}))):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            m = llama(shape, 4 * T, attention, args.device)
            sec, _ = _fit_seconds(m, rows, opt, args.device)
            per_token = flops_per_token(n_params, T if name == "full" else short, shape["num_hidden_layers"],
                                        shape["hidden_size"])
            tflops = T * per_token / sec / 1e12
            peak = torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else float("nan")
            results[name] = (sec, per_token)
            label = f"{name} {T:,}" + (f" ({k} x {short:,})" if name == "longrecipe" else "")
            print(f"   {label:28s} {sec:8.3f} {T / sec:10,.0f} {tflops:8.1f} {tflops / args.peak_tflops:6.1%} {peak:8.1f}")
            del m
        measured = results["longrecipe"][0] / results["full"][0]
        share = results["longrecipe"][1] / results["full"][1]
        print(f"   LongRecipe / full at {T:,} tokens: cost {measured:.3f}, FLOP share {share:.3f}, "
              f"cost / share {measured / share:.3f} (goal <= 1.1)")


# --------------------------------------------------------------------------- 3. length


def length(args) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from longrecipe.batches import Sample, collate
    from longrecipe.head import forward_hidden, output_head
    from longrecipe.loss import chunked_nll_sum
    from longrecipe.model_io import activation_checkpointing

    shape = TINY if args.dry_run else LLAMA_8B
    lengths = [256, 512, 1024] if args.dry_run else [8192 * 2 ** k for k in range(6)]  # 8k .. 256k
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29512))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    t0 = time.perf_counter()
    model = llama(shape, 4 * max(lengths), "sdpa", "cpu").train()
    model.config.use_cache = False
    activation_checkpointing(model, True)
    head, decoder = output_head(model), model.get_decoder()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp}
    if args.device == "cuda":
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    print(f"\n3. length: random Llama {shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B), FSDP2 "
          f"{'with CPU offload ' if args.device == 'cuda' else ''}on one device, bf16, checkpointing, chunked "
          f"loss (set up in {time.perf_counter() - t0:.0f} s)")
    print(f"   plan predicts the longest power-of-two multiple of 8k that fits {args.gpu_memory_gb:.0f} GB: "
          f"{predicted_longest(shape, args.gpu_memory_gb):,} tokens", flush=True)
    rng = np.random.default_rng(2)
    longest = 0
    for T in lengths:
        b = collate([Sample(0, rng.integers(0, shape["vocab_size"], T), longrecipe_positions(T, 3 * T, rng))],
                    0, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            hidden = forward_hidden(model, b.input_ids, b.position_ids, b.attention_mask, decoder=decoder)
            loss = chunked_nll_sum(hidden, b.targets, head, 1024) / b.n_labels
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            print(f"   {T:>8,} tokens: out of memory")
            break
        peak = torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else float("nan")
        print(f"   {T:>8,} tokens: trained, {time.perf_counter() - t:6.1f} s, peak {peak:6.1f} GB, loss {loss.item():.3f}")
        longest = T
        del hidden, loss, b
    print(f"   longest sample that trained: {longest:,} tokens (goal >= 48k)")


def model_shape(shape: dict):
    from longrecipe.model_shape import ModelShape

    return ModelShape(shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
                      shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"],
                      False, 0, "bench")


def predicted_longest(shape: dict, gpu_memory_gb: float) -> int:
    """The longest power-of-two multiple of 8k that `longrecipe plan`'s model says fits."""
    from longrecipe.plan import Setup, device_memory

    s = model_shape(shape)
    setup = Setup("fsdp", 1, "bf16", True, offload_params=True, offload_optimizer=True)
    best, T = 0, 8192
    while T <= 1 << 21 and device_memory(s, setup, T)[1] <= gpu_memory_gb * 1e9:
        best, T = T, 2 * T
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="correctness,throughput,length")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=788.0)
    ap.add_argument("--gpu-memory-gb", type=float, default=None, help="default: the device's (141 on H200)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script only")
    args = ap.parse_args()
    if args.dry_run:
        args.device = "cpu"
    if args.gpu_memory_gb is None:
        args.gpu_memory_gb = (torch.cuda.get_device_properties(0).total_memory / 1e9
                              if args.device == "cuda" else 80.0)
    for part in args.parts.split(","):
        {"correctness": correctness, "throughput": throughput, "length": length}[part](args)


if __name__ == "__main__":
    main()
