"""Inputs of the extension study that the library does not make: the corpus files,
a small BPE tokenizer, and the randomly initialised short-window Llama folder.

Everything is deterministic (seeded) and written only when missing, so the model
folder's content hash, and with it every downstream artifact key, is stable across
reruns of the study.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from longrecipe.models import BOS, EOS, PAD

ROOT = Path(__file__).resolve().parents[2]


def repo_path(path: str | Path) -> str:
    """A path as the reader would type it: relative to the repository when inside it
    (also how the recipes name the study's folders, so artifact keys stay the same)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def shakespeare_chunks(folder: str | Path, chunk_chars: int) -> list[str]:
    """The public-domain texts cut at blank lines into documents of about chunk_chars."""
    out = []
    for f in sorted(Path(folder).glob("*.txt")):
        text = f.read_text(encoding="utf-8")
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        cur: list[str] = []
        size = 0
        for p in paras:
            cur.append(p)
            size += len(p) + 2
            if size >= chunk_chars:
                out.append("\n\n".join(cur) + "\n")
                cur, size = [], 0
        if size >= chunk_chars // 4:  # a short tail is dropped, not a stub document
            out.append("\n\n".join(cur) + "\n")
    return out


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return path


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in open(path) if line.strip()]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE trained on `texts`. Digit runs are split from letters and then
    merged by BPE like any other text; with enough numbers among `texts` the merges cover
    most digit pairs, so a 7-digit pass key is about 4 tokens that rarely repeat inside
    one key. (With one token per digit, nearly every key repeats a digit, and copying it
    token by token is ambiguous: a 1.1M-parameter model did not learn it in 3,000 steps.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD, BOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS)
    fast.save_pretrained(str(out_dir))
    return fast


def number_texts(n: int, seed: int) -> list[str]:
    """Lines of random 7-digit numbers for tokenizer training (the digit-pair merges)."""
    rng = random.Random(seed)
    return [" ".join(str(rng.randint(1_000_000, 9_999_999)) for _ in range(50)) for _ in range(n)]


def init_model(tokenizer, shape: dict, out_dir: Path, seed: int) -> None:
    """A randomly initialised Llama with `shape` (LlamaConfig fields), saved as a
    Hugging Face folder (config.json, model.safetensors) beside the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)


def noise_passkey_texts(n: int, seed: int) -> list[str]:
    """Character-level pass-key texts for tokenizer training only (the real documents
    are fitted to token lengths with the trained tokenizer)."""
    from longrecipe.evaluate import niah

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        hay = niah.noise_haystack().repeated(rng.randint(200, 3000))
        key = f"{rng.choice(niah._ADJECTIVES)}-{rng.choice(niah._NOUNS)}"
        value = str(rng.randint(1_000_000, 9_999_999))
        needle = niah.NEEDLE.format(key=key, value=value)
        cut = rng.randint(0, len(hay))
        ctx = hay[:cut] + " " + needle + " " + hay[cut:]
        out.append(niah.TEMPLATE.format(context=ctx, key=key) + niah.ANSWER_PREFIX.format(key=key)
                   + f" {value}.\n")
    return out


def heldout_by_ingest(text: str, fraction: float) -> bool:
    """Whether ingest puts `text` in split `heldout` (its rule: the text's sha256, read as
    a fraction, below heldout_fraction). run.py checks the ingest agrees."""
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0x1_0000_0000 < fraction


def interleave(pools: list[tuple[list[str], list[int], float]]) -> list[str]:
    """Mix several (texts, token counts, share) pools so that every prefix of the result
    (what the build stage cuts samples from, in order) holds about `share` of its tokens
    from each pool; each pool keeps its order; stops when any pool runs out."""
    out: list[str] = []
    pos = [0] * len(pools)
    got = [0] * len(pools)
    while all(p < len(texts) for p, (texts, _, _) in zip(pos, pools, strict=True)):
        total = sum(got)
        i = max(range(len(pools)), key=lambda k: pools[k][2] * total - got[k])
        texts, tokens, _ = pools[i]
        out.append(texts[pos[i]])
        got[i] += tokens[pos[i]]
        pos[i] += 1
    return out


def exact_windows(tok, heads: list[str], filler: list[int], window: int) -> list[str]:
    """Texts of exactly `window` tokens each (as ingest tokenizes them): each head (a
    pass-key document, or "" for plain text) followed by the filler token stream's next
    tokens, decoded. Pretraining packs documents in order and cuts every `window` tokens,
    so documents of exactly one window make every sample start at a document start: a
    pass-key document is never cut between its needle and its question. A window whose
    text does not tokenize back to `window` tokens (a merge across the cut) is retried
    with one filler token more or less, then skipped."""
    out = []
    pos = 0
    for head in heads:
        n_head = len(tok(head, add_special_tokens=False)["input_ids"]) if head else 0
        need = window - n_head
        if need < 0:
            continue
        for k in (need, need - 1, need + 1, need - 2, need + 2):
            if pos + k > len(filler):
                pos = 0  # the filler stream is reused from its start when it runs out
            text = head + tok.decode(filler[pos:pos + k])
            if len(tok(text, add_special_tokens=False)["input_ids"]) == window:
                out.append(text)
                pos += k
                break
    return out


def drill_text(rng: random.Random, tok, budget: int) -> str:
    """Short pass-key exercises in the evaluation's wording, back to back, at most `budget`
    tokens: a needle, a little noise, the question, the answer prefix and the value. Each
    states a key once and asks for it a few dozen tokens later, so a window of them
    trains the copy from needle to answer about five times more often than one full
    NIAH document does (the template's preamble is left out)."""
    from longrecipe.evaluate import niah

    parts: list[str] = []
    used = 0
    while True:
        key = f"{rng.choice(niah._ADJECTIVES)}-{rng.choice(niah._NOUNS)}"
        value = str(rng.randint(1_000_000, 9_999_999))
        noise = niah.NOISE[: rng.randint(0, len(niah.NOISE))]
        item = (niah.NEEDLE.format(key=key, value=value) + " " + noise + "\n"
                + niah.TEMPLATE.rsplit("\n", 1)[1].format(key=key)
                + niah.ANSWER_PREFIX.format(key=key) + f" {value}.\n")
        n = len(tok(item, add_special_tokens=False)["input_ids"])
        if used + n > budget:
            return "".join(parts)
        parts.append(item)
        used += n
