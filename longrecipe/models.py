"""Model and tokenizer loading: local folders, GGUF files, the `tiny` preset.

Nothing here touches a hub: sources are local paths, and HF_HUB_OFFLINE is set
before transformers is imported. A model's identity (for keys) is a hash of
its files' content (longrecipe.digest: each file is read once per path, size and
mtime), or of the tiny preset's config. A broken config.json or a .gguf file that
is not GGUF fails in `resolve`, naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longrecipe.artifacts import ArtifactRef, canonical_json
from longrecipe.config import ModelSpec, TinyModelConfig
from longrecipe.digest import folder_files, tree_digest
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
        _check_gguf(path)
        return ModelSource("gguf", path.resolve(), tree_digest([(path.name, path)]), spec)
    if not (path / "config.json").exists():
        raise ModelError(f"model source {spec.source!r}: folder has no config.json")
    _check_config(path / "config.json")
    return ModelSource("folder", path.resolve(), tree_digest(folder_files(path.resolve())), spec)


def _check_gguf(path: Path) -> None:
    """A .gguf file starts with the magic bytes `GGUF`; anything else fails here, by name."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def _check_config(path: Path) -> None:
    """config.json must be a JSON object naming a model type (transformers needs it)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: must hold a JSON object, not {type(cfg).__name__}")
    if "model_type" not in cfg:
        raise ModelError(f"{path}: no field 'model_type' (transformers needs it to pick the model)")


# --------------------------------------------------------------------------- tokenizers


def byte_tokenizer(add_bos: bool = False):
    """A byte-level tokenizer built in-process (256 bytes + eos/pad/bos): no files, no hub.
    With add_bos it prepends BOS to every encoded text, as Llama-style tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS)
    if add_bos:
        bos = out.convert_tokens_to_ids(BOS)
        out.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
        )
    return out


def load_tokenizer(model: ModelSpec | ModelSource | ArtifactRef | str | Path):
    """The tokenizer of a model source. Padding side is left (generation batches)."""
    src = model if isinstance(model, ModelSource) else resolve(model)
    if src.kind == "tiny":
        tok = byte_tokenizer(src.spec.tiny.add_bos)
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
    """The device a run names, checked against what torch sees: `auto` is cuda when torch
    sees a CUDA device, else cpu; `cuda:N` (one GPU of several) must be a visible GPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if is_cuda(device):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} asked for, but torch sees no CUDA device")
        index, count = cuda_index(device), torch.cuda.device_count()
        if index is not None and index >= count:
            raise ModelError(f"device {device!r}: torch sees {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif device != "cpu":
        raise ModelError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def is_cuda(device: str) -> bool:
    """`cuda` or `cuda:N`."""
    return device.split(":")[0] == "cuda"


def cuda_index(device: str) -> int | None:
    """N of `cuda:N`; None for `cuda` (the current GPU) and for other devices."""
    head, _, index = device.partition(":")
    return int(index) if head == "cuda" and index else None


def pick_attention(requested: str = "auto", device: str = "cpu") -> str:
    """The attention backend for a model that runs on `device`: `auto` is
    flash_attention_2 on CUDA with flash-attn installed, else sdpa. Call it once, with the
    device the model will run on, and hand the result to `load_model` (which never checks
    it against the device it loads on: training loads on the CPU, then moves)."""
    import importlib.util

    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if is_cuda(device) and has_flash else "sdpa"
    if requested == "flash_attention_2" and not (is_cuda(device) and has_flash):
        raise ModelError("attention 'flash_attention_2' needs CUDA and the flash-attn package")
    if requested == "flex_attention" and not is_cuda(device):
        raise ModelError("attention 'flex_attention' trains on CUDA only (torch has no "
                         "flex_attention backward on CPU)")
    return requested


def tiny_config(cfg: TinyModelConfig, vocab_size: int):
    """The transformers config of the tiny preset for its family (same shape for all)."""
    import transformers

    shape = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        # the byte tokenizer's special ids (bos 256, eos 257, pad 258)
        bos_token_id=256,
        eos_token_id=257 if vocab_size > 257 else None,
        pad_token_id=258 if vocab_size > 258 else None,
    )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # Each family with the traits its released checkpoints have (see TinyModelConfig.family).
    family = {
        "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
        "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
        "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False)),
        "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, head_dim=head_dim,
                                      use_sliding_window=False)),
        "phi3": ("Phi3Config", dict(tie_word_embeddings=False)),
        "gemma2": ("Gemma2Config", dict(tie_word_embeddings=True, head_dim=head_dim,
                                        query_pre_attn_scalar=head_dim,
                                        final_logit_softcapping=30.0,
                                        attn_logit_softcapping=50.0,
                                        sliding_window=cfg.max_position_embeddings // 2)),
    }
    name, extra = family[cfg.family]
    if cfg.family == "phi3":
        rope["partial_rotary_factor"] = 0.5
    return getattr(transformers, name)(rope_parameters=rope, **shape, **extra)


def supported_attention(model_class, attention: str) -> str:
    """`attention` if the model class implements it; sdpa falls back to eager for a class
    without an sdpa path (Gemma-2: its soft-capping is not in sdpa). Any other
    unsupported choice is an error naming the class."""
    flags = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}
    flag = flags.get(attention)
    if flag is None or getattr(model_class, flag, True):
        return attention
    if attention == "sdpa":
        return "eager"
    raise ModelError(f"{model_class.__name__} does not support attention {attention!r}")


def _model_class(config, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None  # remote code or an unknown config: transformers decides


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
    from transformers import AutoModelForCausalLM

    src = model if isinstance(model, ModelSource) else resolve(model)
    dtype = dtype or torch.float32
    # only `auto` is resolved here; a named backend was resolved by the caller for the
    # device the model runs on, which need not be the one it loads on
    attn = pick_attention(attention, device) if attention == "auto" else attention
    if src.kind == "tiny":
        vocab = len(byte_tokenizer())
        config = tiny_config(src.spec.tiny, vocab_size=vocab)
        attn = supported_attention(_model_class(config, False), attn)
        with _seeded(src.spec.tiny.seed):
            m = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
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
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(src.path),
                                            trust_remote_code=src.spec.trust_remote_code)
        cls = _model_class(config, src.spec.trust_remote_code)
        if cls is not None:
            attn = supported_attention(cls, attn)
        m = AutoModelForCausalLM.from_pretrained(
            str(src.path),
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=src.spec.trust_remote_code,
        )
    return m.to(device).eval()


_SEED_LOCK = threading.Lock()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for one initialisation, then put its state back. One
    at a time: threads of a process (the concurrent comparison's branches) share that
    generator, and two initialisations at once would draw from each other's stream."""
    import torch

    with _SEED_LOCK:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.random.set_rng_state(state)
