"""Merging (the paper's stage 2): a weighted average of the original and the annealed
weights, tensor by tensor, so memory stays near one tensor pair (one model at most
when the original must first be materialised).

    merged = (1 - weight) * original + weight * annealed      (paper code: weight 0.5)

Each tensor is read from safetensors on its own (the file is opened and closed per
tensor, so no mapping of a whole model stays resident), averaged in float32 (float64
tensors in float64) and written straight into the output file at its final offset.
Each merged tensor keeps the annealed model's dtype; weight 0 and 1 return the
original (cast to that dtype) and the annealed tensors exactly.

The merged folder is the annealed folder with its weights replaced: it keeps the
extended RoPE and max_position_embeddings of the trained model (the paper merges the
extended model back with the original weights and evaluates it at long context),
its tokenizer and generation config.

An original that is not a folder of safetensors (a GGUF file, the `tiny` preset, a
folder of .bin files) is first loaded and saved as safetensors into the artifact's
scratch folder, which is dropped when the artifact is committed.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import MergeConfig, ModelSpec, RuntimeConfig
from longrecipe.errors import InputError
from longrecipe.models import ModelSource, resolve
from longrecipe.progress import progress_bar

STAGE = "merge"
STAGE_VERSION = "merge_v1"
MODEL_DIR = "files/model"
INDEX = "model.safetensors.index.json"

# names of input embeddings that an output head tied to them aliases
_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


class MergeError(InputError):
    """Models that cannot be merged (different architectures or shapes, missing tensors)."""


def merge_spec(cfg: MergeConfig, original: ModelSource, annealed: ArtifactRef) -> StageSpec:
    return StageSpec(STAGE, STAGE_VERSION, cfg, {"original": original.key, "annealed": annealed.key})


def run_merge(
    cfg: MergeConfig,
    original: ModelSpec | ModelSource | ArtifactRef,
    annealed: ArtifactRef,
    store: ArtifactStore,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> ArtifactRef:
    """Average the original and the annealed model into a new model folder."""
    from longrecipe.model_io import check_weights, quiet_transformers

    src = original if isinstance(original, ModelSource) else resolve(original)
    ann = resolve(annealed)
    check_weights(src)
    check_weights(ann)
    assert ann.path is not None

    def body(w: StageWriter) -> None:
        materialised = not _has_safetensors(src)
        with quiet_transformers():
            orig_dir = materialise(src, w.scratch / "original") if materialised else src.path
        assert orig_dir is not None
        out = w.local_dir / MODEL_DIR
        stats = merge_folders(orig_dir, ann.path, out, cfg.weight, progress=runtime.progress)
        config = json.loads((out / "config.json").read_text())
        w.info.update(
            weight=cfg.weight, original=src.key, original_kind=src.kind,
            original_materialised=materialised, annealed=annealed.key, **stats,
            max_position_embeddings=config.get("max_position_embeddings"),
            rope_parameters=config.get("rope_parameters"),
        )

    return store.produce(merge_spec(cfg, src, annealed), body)


def merge_folders(original: Path, annealed: Path, out: Path, weight: float,
                  *, progress: bool = False) -> dict[str, Any]:
    """Write `out`: the annealed folder's files with each tensor averaged with the original's."""
    orig_cfg, ann_cfg = _config(original), _config(annealed)
    for key in ("model_type", "architectures", "tie_word_embeddings"):
        if orig_cfg.get(key) != ann_cfg.get(key):
            raise MergeError(
                f"cannot merge {original} and {annealed}: config.json {key} differs "
                f"({orig_cfg.get(key)!r} vs {ann_cfg.get(key)!r})"
            )
    orig_map, ann_map = _weight_map(original), _weight_map(annealed)
    tied = bool(ann_cfg.get("tie_word_embeddings", False))
    sources = {name: _original_name(name, orig_map, tied, original) for name in ann_map}
    for name in orig_map:
        if name not in ann_map and not (tied and _is_tied_head(name, ann_map)):
            raise MergeError(
                f"cannot merge: tensor {name!r} is in the original ({original}) but not in the "
                f"annealed model ({annealed})"
            )

    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(annealed.iterdir()):
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)  # config, tokenizer, generation config, index
    n, nbytes, aliased = 0, 0, 0
    shards = sorted(set(ann_map.values()))
    with progress_bar("merge", progress, unit="tensors", total=len(ann_map)) as bar:
        for shard in shards:
            names = [k for k, v in ann_map.items() if v == shard]
            entries, meta = _header(annealed / shard, names)

            def tensors(entries=entries, shard=shard) -> Iterator[Any]:
                for name, _dtype, shape in entries:
                    a = read_tensor(annealed / shard, name)
                    o_name = sources[name]
                    o = read_tensor(original / orig_map[o_name], o_name)
                    if tuple(o.shape) != tuple(shape):
                        raise MergeError(
                            f"cannot merge tensor {name!r}: original shape {tuple(o.shape)} "
                            f"!= annealed shape {tuple(shape)} (different architectures?)"
                        )
                    yield average(o, a, weight)
                    bar.advance(1)

            nbytes += write_safetensors(out / shard, entries, tensors(), meta)
            n += len(entries)
    aliased = sum(1 for k, v in sources.items() if k != v)
    return {"tensors": n, "bytes": nbytes, "shards": len(shards), "tied_aliases": aliased}


def average(original, annealed, weight: float):
    """(1 - weight) * original + weight * annealed, in the annealed tensor's dtype."""
    import torch

    if weight == 1.0:
        return annealed
    if weight == 0.0:
        return original.to(annealed.dtype)
    if not annealed.is_floating_point():
        if not torch.equal(original.to(annealed.dtype), annealed):
            raise MergeError("cannot average non-float tensors that differ")
        return annealed
    acc = torch.float64 if annealed.dtype == torch.float64 else torch.float32
    merged = (1.0 - weight) * original.to(acc) + weight * annealed.to(acc)
    return merged.to(annealed.dtype)


def materialise(src: ModelSource, folder: Path):
    """Load a model that is not in safetensors and save it as such (one model in memory)."""
    import gc

    from longrecipe.models import load_model

    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder  # a killed run got this far
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = load_model(src, device="cpu")
    model.save_pretrained(str(tmp), safe_serialization=True)
    del model
    gc.collect()
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


# --------------------------------------------------------------------------- safetensors


def read_tensor(path: Path, name: str):
    """One tensor, with the file opened and closed around it (nothing else stays mapped)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).clone()


def _header(path: Path, names: list[str]) -> tuple[list[tuple[str, str, list[int]]], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        wanted = set(names)
        entries = []
        for name in f.keys():
            if name in wanted:
                s = f.get_slice(name)
                entries.append((name, s.get_dtype(), list(s.get_shape())))
    return entries, meta


def write_safetensors(path: Path, entries: list[tuple[str, str, list[int]]], tensors: Iterator,
                      metadata: dict | None = None) -> int:
    """Write a safetensors file from a stream of tensors: the header (offsets known from
    dtypes and shapes) first, then each tensor's bytes as it arrives. Returns the data size."""
    import torch

    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in entries:
        size = _DTYPE_BYTES[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
    tmp = path.with_name(path.name + ".inprogress")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for (name, _, shape), t in zip(entries, tensors, strict=True):
            if list(t.shape) != list(shape):
                raise MergeError(f"tensor {name!r}: produced shape {list(t.shape)} != {shape}")
            fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    tmp.rename(path)
    return offset


def _weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index of a sharded model or the single file."""
    from safetensors import safe_open

    index = folder / INDEX
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MergeError(f"{folder} holds no *.safetensors weights")
    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f.name for k in h.keys()})
    return out


def _original_name(name: str, orig_map: dict[str, str], tied: bool, original: Path) -> str:
    if name in orig_map:
        return name
    if tied and name.endswith("lm_head.weight"):
        embeds = [k for k in orig_map if k.endswith(_EMBED_SUFFIXES)]
        if len(embeds) == 1:
            return embeds[0]  # tied head: the original saved only the embeddings
    raise MergeError(
        f"cannot merge: tensor {name!r} of the annealed model is missing from the original "
        f"({original})"
    )


def _is_tied_head(name: str, ann_map: dict[str, str]) -> bool:
    return name.endswith("lm_head.weight") and any(k.endswith(_EMBED_SUFFIXES) for k in ann_map)


def _config(folder: Path) -> dict:
    p = folder / "config.json"
    if not p.exists():
        raise MergeError(f"{folder} has no config.json")
    return json.loads(p.read_text())


def _has_safetensors(src: ModelSource) -> bool:
    return src.kind == "folder" and src.path is not None and any(src.path.glob("*.safetensors"))
