"""The chunked training loss against the model's own (full-logits) loss: peak memory and
time of one training step at 8k tokens with the SmolLM2-135M demo model (49k vocabulary).

Both variants do the same step: one sample of `--tokens` tokens with LongRecipe-style
gapped position ids, bf16 autocast with fp32 master weights, activation checkpointing,
AdamW, clipping. They differ only in the loss:
- full: `model(..., labels=...)`, transformers' loss over [tokens, vocab] logits (the
  loop before this change);
- chunked: `forward_hidden` + `longrecipe.loss.chunked_nll_sum` (the loop now):
  `--chunk` rows of logits at a time, recomputed in backward.

Each run is a fresh subprocess (so memory never carries over); AdamW's state is made
first (a step on zero gradients), then one step is measured: its seconds, its tensor high-water
mark (bench/memtrack.py: weights, optimizer state and every tensor alive at once) and
the process's peak RSS (ru_maxrss, model loading included). Runs alternate
full, chunked, chunked, full, ... so drifting load hits both; the fastest run of each
is compared. Goals: peak at most 0.6x, time at most 1.1x.

    OMP_NUM_THREADS=2 python bench/bench_loss.py [--tokens 8192] [--chunk 1024] [--repeats 2]
    OMP_NUM_THREADS=2 python bench/bench_loss.py --loss-only --repeats 6   # the part that differs
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


def one(variant: str, tokens: int, chunk: int) -> dict:
    import resource
    import time

    import numpy as np
    import torch
    from memtrack import TensorMemory

    from longrecipe import ModelSpec
    from longrecipe.batches import Sample, collate
    from longrecipe.head import forward_hidden, output_head
    from longrecipe.loss import chunked_nll_sum
    from longrecipe.model_io import activation_checkpointing
    from longrecipe.models import load_model
    from longrecipe.rope import apply_rope

    model = load_model(ModelSpec(source=str(DEMO_GGUF)), attention="sdpa").train()
    model.config.use_cache = False
    apply_rope(model, None, 3 * tokens, training=True)
    activation_checkpointing(model, True)
    head = output_head(model)
    rng = np.random.default_rng(0)
    pos = np.concatenate([[0], np.sort(rng.choice(np.arange(1, 3 * tokens), tokens - 1, replace=False))])
    b = collate([Sample(0, rng.integers(0, 49152, tokens), pos)], pad_id=0, device="cpu")
    labels = torch.where(b.attention_mask.bool(), b.input_ids, torch.full_like(b.input_ids, -100))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if variant == "full":
                loss = model(input_ids=b.input_ids, position_ids=b.position_ids,
                             attention_mask=b.attention_mask, labels=labels, use_cache=False).loss
            else:
                hidden = forward_hidden(model, b.input_ids, b.position_ids, b.attention_mask)
                loss = chunked_nll_sum(hidden, b.targets, head, chunk) / b.n_labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for p in model.parameters():  # AdamW's state as after a first step, without its cost
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    tracker = TensorMemory(existing=[*model.parameters(), *state])
    t = time.perf_counter()
    with tracker:
        loss = step()
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "seconds": seconds, "tensors": tracker.peak, "rss": rss, "loss": loss}


def loss_part(tokens: int, chunk: int, repeats: int) -> None:
    """Only what differs between the variants: output head + cross-entropy, forward and
    backward, on fixed hidden states, alternating in one process (time only)."""
    import statistics
    import time

    import torch

    from longrecipe import ModelSpec
    from longrecipe.head import output_head
    from longrecipe.loss import chunked_nll_sum, full_nll_sum
    from longrecipe.models import load_model

    model = load_model(ModelSpec(source=str(DEMO_GGUF)), attention="sdpa")
    head = output_head(model)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, model.config.hidden_size, generator=g, requires_grad=True)
    targets = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    times: dict[str, list[float]] = {"full": [], "chunked": []}
    for i in range(repeats):
        for name in ("full", "chunked") if i % 2 == 0 else ("chunked", "full"):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (full_nll_sum(hidden, targets, head) if name == "full"
                        else chunked_nll_sum(hidden, targets, head, chunk))
            loss.backward()
            times[name].append(time.perf_counter() - t)
            hidden.grad = None
            model.zero_grad(set_to_none=True)
    f, c = times["full"], times["chunked"]
    print(f"output head + loss only, {tokens} tokens, {repeats} alternating runs each: full "
          f"{min(f):.2f} s (median {statistics.median(f):.2f}), chunked {min(c):.2f} s (median "
          f"{statistics.median(c):.2f}); chunked / full {min(c) / min(f):.3f} fastest, "
          f"{statistics.median(c) / statistics.median(f):.3f} median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loss-only", action="store_true",
                    help="time only the output head + loss (fixed hidden states), in one process")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loss_only:
        loss_part(args.tokens, args.chunk, max(args.repeats, 3))
        return
    if args.one:
        print(json.dumps(one(args.one, args.tokens, args.chunk)))
        return
    if not DEMO_GGUF.exists():
        raise SystemExit("demo model not fetched: longrecipe data fetch demo")
    import torch

    print(f"SmolLM2-135M, one sample of {args.tokens} tokens, bf16 autocast, activation "
          f"checkpointing, sdpa, chunk {args.chunk}, torch threads {torch.get_num_threads()}")
    runs: dict[str, list[dict]] = {"full": [], "chunked": []}
    order = []
    for i in range(args.repeats):
        order += ["full", "chunked"] if i % 2 == 0 else ["chunked", "full"]
    for variant in order:
        out = subprocess.run([sys.executable, __file__, "--one", variant, "--tokens", str(args.tokens),
                              "--chunk", str(args.chunk)], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        runs[variant].append(r)
        print(f"  {variant:8s} {r['seconds']:7.2f} s  tensors {r['tensors'] / 1e9:6.2f} GB  "
              f"RSS {r['rss'] / 1e9:6.2f} GB  loss {r['loss']:.5f}")
    f, c = runs["full"], runs["chunked"]
    t_f, t_c = min(r["seconds"] for r in f), min(r["seconds"] for r in c)
    m_f, m_c = max(r["tensors"] for r in f), max(r["tensors"] for r in c)
    r_f, r_c = max(r["rss"] for r in f), max(r["rss"] for r in c)
    print(f"peak tensors: chunked / full = {m_c / m_f:.3f} ({m_c / 1e9:.2f} vs {m_f / 1e9:.2f} GB; goal <= 0.6)")
    print(f"peak RSS:     chunked / full = {r_c / r_f:.3f} ({r_c / 1e9:.2f} vs {r_f / 1e9:.2f} GB)")
    pairs = ", ".join(f"{a['seconds'] / b['seconds']:.3f}" for a, b in zip(c, f, strict=True))
    print(f"step time:    chunked / full = {t_c / t_f:.3f} (fastest {t_c:.2f} vs {t_f:.2f} s; goal <= 1.1); "
          f"per pair {pairs}")
    print(f"loss: chunked {c[0]['loss']:.6f}, full {f[0]['loss']:.6f}")


if __name__ == "__main__":
    main()
