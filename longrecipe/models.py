"""Model and tokenizer loading: local folders, GGUF files, the `tiny` preset.

Nothing here touches a hub: sources are local paths, and HF_HUB_OFFLINE is set
before transformers is imported. A model's identity (for keys) is a hash of
its files' content, or of the tiny preset's config.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longrecipe.artifacts import ArtifactRef, canonical_json
from longrecipe.config import ModelSpec, TinyModelConfig
from longrecipe.errors import InputError

if TYPE_CHECKING:
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EOS, PAD, BOS = "<|eos|>", "<|pad|>", "<|bos|>"


class ModelError(InputError):
    """A model source that cannot be used (missing, not a model, unsupported)."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what to load and its identity for keys."""

    kind: str  # "tiny" | "folder" | "gguf"
    path: Path | None
    identity: str
    spec: ModelSpec

    @property
    def key(self) -> str:
        return self.identity


def resolve(model: ModelSpec | ArtifactRef | str | Path) -> ModelSource:
    """Turn a spec, a model artifact or a path into a loadable source with a content identity."""
    if isinstance(model, ArtifactRef):
        folder = model.path / "files" / "model"
        if not folder.is_dir():
            raise ModelError(f"artifact {model.stage}/{model.key} holds no model folder")
        return ModelSource("folder", folder, model.key, ModelSpec(source=str(folder)))
    spec = model if isinstance(model, ModelSpec) else ModelSpec(source=str(model))
    if spec.source == "tiny":
        ident = hashlib.sha256(canonical_json({"tiny": spec.tiny}).encode()).hexdigest()[:16]
        return ModelSource("tiny", None, f"tiny-{ident}", spec)
    path = Path(spec.source).expanduser()
    if not path.exists():
        raise ModelError(f"model source {spec.source!r}: no such file or folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model source {spec.source!r}: a file must be a .gguf")
        return ModelSource("gguf", path.resolve(), _content_hash(path.resolve()), spec)
    if not (path / "config.json").exists():
        raise ModelError(f"model source {spec.source!r}: folder has no config.json")
    return ModelSource("folder", path.resolve(), _content_hash(path.resolve()), spec)


@functools.lru_cache(maxsize=32)
def _content_hash(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- tokenizers


def byte_tokenizer():
    """A byte-level tokenizer built in-process (256 bytes + eos/pad/bos): no files, no hub."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS)


def load_tokenizer(model: ModelSpec | ModelSource | ArtifactRef | str | Path):
    """The tokenizer of a model source. Padding side is left (generation batches)."""
    src = model if isinstance(model, ModelSource) else resolve(model)
    if src.kind == "tiny":
        tok = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        kwargs: dict[str, Any] = {"trust_remote_code": src.spec.trust_remote_code}
        folder = src.path
        if src.kind == "gguf":
            kwargs["gguf_file"] = src.path.name
            folder = src.path.parent
        tok = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


# --------------------------------------------------------------------------- models


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' asked for, but torch sees no CUDA device")
    return device


def pick_attention(requested: str = "auto", device: str = "cpu") -> str:
    """The attention backend for a model that runs on `device`: `auto` is
    flash_attention_2 on CUDA with flash-attn installed, else sdpa. Call it once, with the
    device the model will run on, and hand the result to `load_model` (which never checks
    it against the device it loads on: training loads on the CPU, then moves)."""
    import importlib.util

    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if device == "cuda" and has_flash else "sdpa"
    if requested == "flash_attention_2" and not (device == "cuda" and has_flash):
        raise ModelError("attention 'flash_attention_2' needs CUDA and the flash-attn package")
    if requested == "flex_attention" and device != "cuda":
        raise ModelError("attention 'flex_attention' trains on CUDA only (torch has no "
                         "flex_attention backward on CPU)")
    return requested


def tiny_config(cfg: TinyModelConfig, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=257 if vocab_size > 257 else None,
        eos_token_id=256,
        pad_token_id=258 if vocab_size > 258 else None,
    )


def load_model(
    model: ModelSpec | ModelSource | ArtifactRef | str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    attention: str = "auto",
):
    """Load a causal LM in eval mode. GGUF weights are dequantised and the quantizer
    detached so the model can be trained and saved like any other. `attention`: `auto`
    (resolved for `device`) or a backend name used as given (see `pick_attention`)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    src = model if isinstance(model, ModelSource) else resolve(model)
    dtype = dtype or torch.float32
    # only `auto` is resolved here; a named backend was resolved by the caller for the
    # device the model runs on, which need not be the one it loads on
    attn = pick_attention(attention, device) if attention == "auto" else attention
    if src.kind == "tiny":
        vocab = len(byte_tokenizer())
        config = tiny_config(src.spec.tiny, vocab_size=vocab)
        config._attn_implementation = attn
        with _seeded(src.spec.tiny.seed):
            m = LlamaForCausalLM(config)
        m = m.to(dtype)
    elif src.kind == "gguf":
        m = AutoModelForCausalLM.from_pretrained(
            str(src.path.parent), gguf_file=src.path.name, dtype=dtype, attn_implementation=attn
        )
        m.hf_quantizer = None
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        m.is_quantized = False
    else:
        m = AutoModelForCausalLM.from_pretrained(
            str(src.path),
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=src.spec.trust_remote_code,
        )
    return m.to(device).eval()


class _seeded:
    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        import torch

        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        import torch

        torch.random.set_rng_state(self.state)
