"""Benchmark of the training loop, two comparisons in one run, same model throughout.

1. Cost of a LongRecipe step against a full-length step: one sample of
   train_len = fraction x target (LongRecipe position ids spread over the target
   window) against one sample of target tokens (full, contiguous), both through
   our loop (`fit`). Reports seconds per optimizer step, their ratio, and the
   analytic FLOP ratio (6N + 6 L n_layers d_model per token) for this model and for
   Llama-3-8B at 24k vs 80k (the paper's setting).
2. Overhead of our loop against a bare PyTorch loop on the same batches: same
   model, optimizer, schedule, autocast, clipping and forward call; the bare loop
   has no accelerate, no data stream, no metrics, no progress bar. Reports the ratio
   (goal: at most 1.1x).

Runs are interleaved A B B A A B ... so a load that drifts during the run (other jobs
on a shared machine) hits both sides alike; the fastest run of each side is compared
(the least disturbed), and the per-pair ratios are printed beside it.

    OMP_NUM_THREADS=1 python bench/bench_train.py [--target 4096] [--fraction 0.3] \\
        [--steps 3] [--overhead-len 1024] [--overhead-steps 10] [--repeats 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

from longrecipe import (
    ArtifactStore,
    ModelSpec,
    OptimConfig,
    RuntimeConfig,
    StageSpec,
    TinyModelConfig,
)
from longrecipe.batches import SampleStream, collate
from longrecipe.distributed import make_accelerator
from longrecipe.head import forward_hidden, output_head
from longrecipe.loop import fit, make_schedule
from longrecipe.loss import chunked_nll_sum
from longrecipe.models import load_model
from longrecipe.rope import apply_rope

QUIET = RuntimeConfig(progress=False, device="cpu")  # main() sets the device from --device


def model_spec(d: int, layers: int, heads: int) -> ModelSpec:
    return ModelSpec(tiny=TinyModelConfig(
        hidden_size=d, intermediate_size=int(d * 8 / 3) // 8 * 8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
    ))


def samples(store: ArtifactStore, method: str, length: int, target: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if method == "full":
            pos = np.arange(length)
        else:  # sentences of ~20 tokens, contiguous inside, random gaps between
            cuts = np.sort(rng.choice(np.arange(1, length), length // 20, replace=False))
            m = len(cuts)
            gaps = rng.multinomial(target - length, np.ones(m) / m)
            pos = np.arange(length) + np.concatenate([[0], np.cumsum(gaps)])[
                np.searchsorted(cuts, np.arange(length), side="right")]
        assert pos[-1] < target
        rows.append({"sample_id": i, "method": method,
                     "input_ids": rng.integers(0, 256, length).astype(np.int32).tolist(),
                     "position_ids": pos.astype(np.int32).tolist(), "n_tokens": length,
                     "max_position": int(pos[-1])})
    spec = StageSpec("build", "bench_v1", {"m": method, "len": length, "t": target, "n": n}, {})
    return store.produce(spec, lambda w: w.write_table("samples", pa.Table.from_pylist(rows)))


def fresh_model(spec: ModelSpec, target: int):
    m = load_model(spec, attention="auto", device=QUIET.device)
    apply_rope(m, None, target)
    return m


def ours(store, spec, ref, optim, target) -> tuple[float, list[float]]:
    """Seconds for `fit` (optimizer set-up, data stream, the steps, metrics), and per step."""
    model = fresh_model(spec, target)
    acc = make_accelerator(QUIET, optim)
    out = {}

    def body(w):
        t = time.perf_counter()
        result = fit(model, ref, optim, w, QUIET, acc, attention=model.config._attn_implementation)
        out["s"] = time.perf_counter() - t
        elapsed = [0.0] + [r["elapsed_s"] for r in result.metrics]
        out["steps"] = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
        raise _Done  # keep nothing: every repeat trains from scratch

    try:
        store.produce(StageSpec("bench", "bench_v1", {"r": time.time_ns()}, {}), body)
    except _Done:
        pass
    return out["s"], out["steps"]


class _Done(Exception):
    pass


def bare(spec, ref, optim, target) -> tuple[float, list[float]]:
    """The same steps as a plain PyTorch loop over pre-collated batches (the same forward
    call and chunked loss); total and per step."""
    model = fresh_model(spec, target)
    model.train()
    model.config.use_cache = False
    head = output_head(model)
    stream = SampleStream(ref, optim.seed)
    batches = [collate(stream.take(i * optim.batch_size, optim.batch_size), 0, QUIET.device)
               for i in range(optim.max_steps * optim.grad_accum)]
    t = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas,
                            weight_decay=optim.weight_decay)
    sched = make_schedule(opt, optim)
    it = iter(batches)
    steps = []
    for _ in range(optim.max_steps):
        started = time.perf_counter()
        for _ in range(optim.grad_accum):
            b = next(it)
            with torch.autocast(QUIET.device, dtype=torch.bfloat16, enabled=optim.precision == "bf16"):
                hidden = forward_hidden(model, b.input_ids, b.position_ids, b.attention_mask)
                loss = chunked_nll_sum(hidden, b.targets, head, optim.loss_chunk_tokens) / b.n_labels
            (loss / optim.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        steps.append(time.perf_counter() - started)
    return time.perf_counter() - t, steps


def flops_per_token(n_params: float, length: int, layers: int, d: int) -> float:
    # causal attention: half of the full L x L score and value products, forward + backward
    return 6 * n_params + 6 * length * layers * d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=int, default=4096)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--overhead-len", type=int, default=1024)
    ap.add_argument("--overhead-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--parts", default="1,2", help="which comparisons to run (1, 2 or 1,2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (attention: flash-attn when "
                    "installed, else sdpa)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the device's dense bf16 peak for MFU (H100/H200 SXM: 989)")
    args = ap.parse_args()
    global QUIET
    QUIET = RuntimeConfig(progress=False, device=args.device)

    spec = model_spec(args.d, args.layers, args.heads)
    n_params = sum(p.numel() for p in load_model(spec).parameters())
    print(f"model: random Llama d={args.d} layers={args.layers} heads={args.heads} "
          f"({n_params / 1e6:.2f}M params), device {args.device}, torch threads "
          f"{torch.get_num_threads()}, bf16 autocast, attention {fresh_model(spec, 256).config._attn_implementation}")

    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(tmp)
        parts = {int(p) for p in args.parts.split(",")}
        if 1 in parts:
            step_cost(store, spec, args, n_params)
        if 2 in parts:
            loop_overhead(store, spec, args)


def step_cost(store, spec, args, n_params: int) -> None:
    """1. LongRecipe at fraction x target vs full length at target."""
    short = int(round(args.fraction * args.target))
    lr_ref = samples(store, "longrecipe", short, args.target, args.steps + 1)
    full_ref = samples(store, "full", args.target, args.target, args.steps + 1)
    optim = OptimConfig(lr=1e-4, max_steps=args.steps + 1, precision="bf16")
    times = {"longrecipe": [], "full": []}
    for i in range(args.repeats):
        pair = (("longrecipe", lr_ref), ("full", full_ref))
        for name, ref in pair if i % 2 == 0 else pair[::-1]:
            times[name].append(ours(store, spec, ref, optim, args.target)[0])
    per_step = {k: min(v) / optim.max_steps for k, v in times.items()}
    ratio = per_step["longrecipe"] / per_step["full"]
    f_short = short * flops_per_token(n_params, short, args.layers, args.d)
    f_full = args.target * flops_per_token(n_params, args.target, args.layers, args.d)
    f8_short = 24_000 * flops_per_token(8.0e9, 24_000, 32, 4096)
    f8_full = 80_000 * flops_per_token(8.0e9, 80_000, 32, 4096)
    print(f"\n1. one step, LongRecipe {short} tokens (positions over {args.target}) vs "
          f"full {args.target} tokens, fastest of {args.repeats} runs of {optim.max_steps} steps")
    print(f"   longrecipe  {per_step['longrecipe']:.3f} s/step")
    print(f"   full        {per_step['full']:.3f} s/step")
    print(f"   measured cost ratio {ratio:.3f}  ({(1 - ratio) * 100:.1f}% less per sample)")
    if args.device == "cuda":  # model FLOPs utilisation of the measured steps
        for name, tokens, f in (("longrecipe", short, f_short), ("full", args.target, f_full)):
            tflops = f / per_step[name] / 1e12
            print(f"   {name}: {tokens / per_step[name]:,.0f} tokens/s, {tflops:.1f} TFLOP/s, "
                  f"MFU {100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:.0f}")
    print(f"   analytic FLOP ratio, this model: {f_short / f_full:.3f}  "
          f"({(1 - f_short / f_full) * 100:.1f}% less)")
    print(f"   analytic FLOP ratio, Llama-3-8B 24k vs 80k: {f8_short / f8_full:.3f}  "
          f"({(1 - f8_short / f8_full) * 100:.1f}% less; paper: over 85%)")


def loop_overhead(store, spec, args) -> None:
    """2. Our loop vs a bare PyTorch loop on the same batches."""
    ref = samples(store, "longrecipe", args.overhead_len, args.target, args.overhead_steps, seed=1)
    optim = OptimConfig(lr=1e-4, max_steps=args.overhead_steps, precision="bf16")
    runs = {"ours": [], "bare": []}
    for i in range(args.repeats):
        for name in ("bare", "ours") if i % 2 == 0 else ("ours", "bare"):
            if name == "bare":
                runs[name].append(bare(spec, ref, optim, args.target))
            else:
                runs[name].append(ours(store, spec, ref, optim, args.target))
    t_ours, t_bare = ([r[0] for r in runs[k]] for k in ("ours", "bare"))
    s_ours, s_bare = (min(s for r in runs[k] for s in r[1]) for k in ("ours", "bare"))
    pairs = [o / b for o, b in zip(t_ours, t_bare, strict=True)]
    print(f"\n2. {args.overhead_steps} steps of {args.overhead_len} tokens, "
          f"{args.repeats} interleaved runs each")
    print(f"   bare PyTorch loop  runs: {', '.join(f'{t:.3f}' for t in t_bare)} s")
    print(f"   our loop (fit)     runs: {', '.join(f'{t:.3f}' for t in t_ours)} s")
    print(f"   whole run, fastest vs fastest: {min(t_ours) / min(t_bare):.3f}x; per pair: "
          f"{', '.join(f'{r:.3f}' for r in pairs)} (median {statistics.median(pairs):.3f}x)")
    print(f"   fastest step: ours {s_ours:.4f} s, bare {s_bare:.4f} s: "
          f"{s_ours / s_bare:.3f}x (goal <= 1.1x)")


if __name__ == "__main__":
    main()
