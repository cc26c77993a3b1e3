"""A model's shape (widths, layers, heads, vocabulary) without loading its weights:
from the `tiny` preset, a folder's config.json, a GGUF file's metadata header, or a
config.json written for planning (`plan.model_shape`), for when the model is not here.
Used by `longrecipe plan`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from longrecipe.config import ModelSpec
from longrecipe.errors import InputError


class ShapeError(InputError):
    """The shape of a model cannot be read; the message names the file or field."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers the cost of a decoder-only transformer follows from."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    max_position: int
    source: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of one Llama-style decoder layer (attention, gated MLP, two norms)."""
        d = self.hidden
        return 2 * d * d + 2 * d * self.kv_dim + 3 * d * self.intermediate + 2 * d

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.embedding_params
        return self.layers * self.layer_params + self.embedding_params + head + self.hidden


def read_shape(spec: ModelSpec, override: str | None = None, fallback: str | None = None) -> ModelShape:
    """The shape of `spec`: the config.json `override` when given, else the model's own
    (preset, config.json, GGUF header), else the config.json `fallback` when the model is
    not here."""
    if override is not None:
        return _from_config_json(Path(override))
    if fallback is not None and spec.source != "tiny" and not Path(spec.source).expanduser().exists():
        return _from_config_json(Path(fallback))
    if spec.source == "tiny":
        t = spec.tiny
        from longrecipe.models import byte_tokenizer

        return ModelShape(t.hidden_size, t.intermediate_size, t.num_hidden_layers,
                          t.num_attention_heads, t.num_key_value_heads, len(byte_tokenizer()),
                          True, t.max_position_embeddings, "tiny preset")
    path = Path(spec.source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    if (path / "config.json").is_file():
        return _from_config_json(path / "config.json")
    raise ShapeError(
        f"model.source {spec.source!r}: no config.json or .gguf file here; to plan without "
        "the model, give its config.json as plan.model_shape in the recipe or --model-config "
        "(configs/models/ holds some)"
    )


def _from_config_json(path: Path) -> ModelShape:
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise ShapeError(f"{path}: cannot read it: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ShapeError(f"{path}: not valid JSON: {e}") from e
    cfg = cfg.get("text_config", cfg)
    try:
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            hidden=int(cfg["hidden_size"]), intermediate=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            max_position=int(cfg.get("max_position_embeddings") or 0), source=str(path),
        )
    except KeyError as e:
        raise ShapeError(f"{path}: no field {e.args[0]!r} (need hidden_size, intermediate_size, "
                         "num_hidden_layers, num_attention_heads, vocab_size)") from None


def _from_gguf(path: Path) -> ModelShape:
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def field(name: str, default=None):
        f = r.fields.get(name)
        if f is None:
            if default is None:
                raise ShapeError(f"{path}: GGUF metadata has no {name!r}")
            return default
        return f.contents()

    arch = field("general.architecture")
    heads = int(field(f"{arch}.attention.head_count"))
    vocab = field(f"{arch}.vocab_size", 0) or len(r.fields["tokenizer.ggml.tokens"].data)
    return ModelShape(
        hidden=int(field(f"{arch}.embedding_length")), intermediate=int(field(f"{arch}.feed_forward_length")),
        layers=int(field(f"{arch}.block_count")), heads=heads,
        kv_heads=int(field(f"{arch}.attention.head_count_kv", heads)), vocab=int(vocab),
        tied=not any(t.name == "output.weight" for t in r.tensors),
        max_position=int(field(f"{arch}.context_length", 0)), source=str(path),
    )
