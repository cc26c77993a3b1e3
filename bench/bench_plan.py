"""`longrecipe plan`'s memory model against the memory a training step really takes.

Each case runs in its own fresh subprocess: a random model of the planned shape (the
tiny preset, or SmolLM2-135M's shape read from the demo GGUF's header) trains two
optimizer steps of one sample through our loop (`fit`: chunked loss, AdamW, the
configured precision and checkpointing) on the CPU; the measured figure is the peak
resident memory (ru_maxrss) minus the resident memory just before the model was
built. The plan's peak for the same shape and settings (device "cpu": no AdamW
foreach temporaries) is printed beside it, with the ratio.

    OMP_NUM_THREADS=1 python bench/bench_plan.py [--cases tiny-4k,demo-2k-bf16,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # memtrack
DEMO_GGUF = ROOT / "data/external/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# name: (model, tokens, precision, activation checkpointing, loss chunk)
CASES = {
    "tiny-4k": ("tiny", 4096, "fp32", False, 1024),
    "tiny-4k-ckpt": ("tiny", 4096, "fp32", True, 1024),
    "tiny-16k": ("tiny", 16384, "fp32", False, 4096),
    "tiny-wide-8k": ("tiny-wide", 8192, "fp32", False, 1024),
    "demo-512": ("demo", 512, "fp32", False, 4096),
    "demo-2k-bf16": ("demo", 2048, "bf16", False, 1024),
    "demo-2k-bf16-ckpt": ("demo", 2048, "bf16", True, 1024),
}


def shape_of(model: str):
    from longrecipe import ModelSpec, TinyModelConfig
    from longrecipe.model_shape import read_shape

    if model == "tiny":
        return read_shape(ModelSpec())
    if model == "tiny-wide":
        return read_shape(ModelSpec(tiny=TinyModelConfig(hidden_size=256, intermediate_size=688,
                                                         num_hidden_layers=4, num_attention_heads=4,
                                                         num_key_value_heads=2)))
    return read_shape(ModelSpec(source=str(DEMO_GGUF)))


def planned(case: str) -> float:
    from longrecipe.plan import Setup, device_memory

    model, tokens, precision, ckpt, chunk = CASES[case]
    setup = Setup("none", 1, precision, ckpt, chunk=chunk, device="cpu")
    return device_memory(shape_of(model), setup, tokens)[1]


def measure(case: str) -> dict:
    """Run in a fresh process: two training steps of one sample; the second is measured
    (tensor high-water mark over the weights and optimizer state it starts with), and the
    process's peak RSS growth since just before the model was built."""
    import resource

    import numpy as np
    import torch
    from memtrack import TensorMemory
    from transformers import LlamaConfig, LlamaForCausalLM

    from longrecipe.batches import Sample, collate
    from longrecipe.head import forward_hidden, output_head
    from longrecipe.loss import chunked_nll_sum
    from longrecipe.model_io import activation_checkpointing

    model, tokens, precision, ckpt, chunk = CASES[case]
    s = shape_of(model)
    rng = np.random.default_rng(0)
    gaps = np.sort(rng.choice(np.arange(1, 3 * tokens), tokens - 1, replace=False))
    batch = collate([Sample(0, rng.integers(0, s.vocab, tokens), np.concatenate([[0], gaps]))], 0, "cpu")
    torch.ones(1024, 1024).sum()  # warm the allocator and kernels before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads, max_position_embeddings=3 * tokens,
                         tie_word_embeddings=s.tied)
    config._attn_implementation = "sdpa"
    m = LlamaForCausalLM(config).train()
    if ckpt:
        activation_checkpointing(m, True)
    head = output_head(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)

    def step():  # the loop's step (longrecipe.loop.fit) without accelerate's no-op wrappers
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            hidden = forward_hidden(m, batch.input_ids, batch.position_ids, batch.attention_mask)
            nll = chunked_nll_sum(hidden, batch.targets, head, chunk)
        (nll / batch.n_labels).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    tracker = TensorMemory(existing=[*m.parameters(), *state])
    t0 = __import__("time").perf_counter()
    with tracker:
        step()
    seconds = __import__("time").perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "params": s.params, "tensors": tracker.peak, "rss": peak - before,
            "seconds_per_step": seconds}


class _Done(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    print(f"{'case':20s} {'params':>9s} {'tensors MB':>11s} {'RSS MB':>8s} {'planned MB':>11s} "
          f"{'plan/tensors':>13s} {'plan/RSS':>9s}")
    for case in args.cases.split(","):
        if CASES[case][0] == "demo" and not DEMO_GGUF.exists():
            print(f"{case:20s} skipped: demo model not fetched (longrecipe data fetch demo)")
            continue
        r = json.loads(subprocess.run([sys.executable, __file__, "--one", case], check=True,
                                      capture_output=True, text=True).stdout.strip().splitlines()[-1])
        p = planned(case)
        print(f"{case:20s} {r['params'] / 1e6:8.2f}M {r['tensors'] / 1e6:11.1f} {r['rss'] / 1e6:8.1f} "
              f"{p / 1e6:11.1f} {p / r['tensors']:13.2f} {p / r['rss']:9.2f}")


if __name__ == "__main__":
    main()
