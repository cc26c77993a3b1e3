"""Benchmark: the evaluate stage's greedy decoding against transformers' `generate`.

Same model, same NIAH prompts (the stage's own inputs), same number of new tokens,
greedy on both sides, EOS stops both. Ours: batched prefill with left padding,
explicit mask and positions, one token per step from the KV cache. Baseline:
`model.generate(do_sample=False)` one prompt at a time. Runs alternate (baseline,
ours, ...) in one process, so machine noise hits both; medians are compared. The
token ids must agree (a correctness check as well as a timing).

Also timed, for what the stage does by default: ours with the newline stop (NIAH
answers end at the first line break), and ours batched.

    OMP_NUM_THREADS=2 python bench/bench_evaluate.py                    # demo model
    OMP_NUM_THREADS=2 python bench/bench_evaluate.py --model tiny --length 2048
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data/external/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEMO) if DEMO.exists() else "tiny")
    ap.add_argument("--length", type=int, default=1024, help="NIAH length (tokens)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from longrecipe.config import ModelSpec
    from longrecipe.evaluate.generate import generate
    from longrecipe.evaluate.niah import depth_grid, niah_samples, noise_haystack
    from longrecipe.models import load_model, load_tokenizer

    spec = ModelSpec(source=args.model)
    tok, model = load_tokenizer(spec), load_model(spec)
    samples = niah_samples(args.length, depth_grid(args.prompts), tok, noise_haystack(),
                           max_new_tokens=args.max_new)
    prompts = [s.prompt for s in samples]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def baseline() -> list[list[int]]:
        out = []
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            with torch.inference_mode():
                ids = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new,
                                     pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
        return out

    def ours(batch: int, newline: bool):
        return lambda: [g.token_ids for g in generate(model, tok, prompts, args.max_new,
                                                       stop_at_newline=newline, batch_size=batch)]

    runs = {"hf_generate": baseline, "ours": ours(1, False), "ours_newline_stop": ours(1, True),
            f"ours_batch{len(prompts)}": ours(len(prompts), False)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)

    same = outputs["ours"] == outputs["hf_generate"]
    same_batched = outputs[f"ours_batch{len(prompts)}"] == outputs["hf_generate"]
    n_in = sum(s.n_input_tokens for s in samples) / len(samples)
    print(f"model {Path(args.model).name}, {len(prompts)} NIAH prompts of ~{n_in:.0f} tokens, "
          f"{args.max_new} new tokens, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    base = statistics.median(times["hf_generate"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<20} {med:8.2f} s  {med / len(prompts):7.2f} s/prompt  "
              f"x{base / med:5.2f} vs hf_generate")
    print(f"  same tokens as hf_generate: ours {same}, batched {same_batched}")
    print(f"  new tokens per prompt: ours {[len(x) for x in outputs['ours']]}, "
          f"newline stop {[len(x) for x in outputs['ours_newline_stop']]}")
    if not same:
        raise SystemExit("ours and hf_generate disagree")


if __name__ == "__main__":
    main()
