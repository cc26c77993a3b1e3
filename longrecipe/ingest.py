"""Corpus ingest: read sources, tokenize, mark sentence ends, write `documents`.

Table `documents`: doc_id, source, split, text, n_tokens, input_ids (int32
list), sentence_ends (int32 list: exclusive end index of each sentence in
input_ids; the last one is always n_tokens).

Texts are encoded by `longrecipe.tokens.encode`, the one BOS policy of the
pipeline: a leading BOS where the tokenizer adds one by default (Llama-3,
Mistral, Gemma), none where it does not (Qwen, SmolLM2). The manifest records
the policy and the EOS id that build puts between documents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import IngestConfig, ModelSpec, RuntimeConfig, SourceSpec
from longrecipe.digest import folder_files, tree_digest
from longrecipe.errors import InputError
from longrecipe.models import ModelSource, load_tokenizer, resolve
from longrecipe.progress import progress_bar
from longrecipe.tokens import encode, token_policy

STAGE = "ingest"
STAGE_VERSION = "ingest_v2"  # v2: BOS as the tokenizer adds it (longrecipe.tokens)

DOCUMENTS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("text", pa.large_string()),
        ("n_tokens", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("sentence_ends", pa.list_(pa.int32())),
    ]
)

# A token ends a sentence when its text, stripped of spaces, ends with one of these
# or when it holds a newline (tokenizer-agnostic version of the public code's rule).
SENTENCE_END_CHARS = (".", "!", "?", "。", "！", "？")


class IngestError(InputError):
    """Bad corpus input; the message names the file and the line or row."""


def ingest_spec(cfg: IngestConfig, tokenizer: ModelSource) -> StageSpec:
    """The key holds the content of every corpus file (not only its path): edit a file
    and ingest, and everything after it, reruns."""
    return StageSpec(STAGE, STAGE_VERSION, cfg,
                     {"tokenizer": tokenizer.key, "corpus": corpus_identity(cfg.sources)})


def corpus_identity(sources: list[SourceSpec]) -> str:
    """16 hex digits over every file the sources read, by name and content (each file is
    hashed once per path, size and mtime: unchanged files are not re-read)."""
    files = []
    for i, s in enumerate(sources):
        files += [(f"{i}:{name}", path) for name, path in source_files(s)]
    return tree_digest(files)


def source_files(s: SourceSpec) -> list[tuple[str, Path]]:
    """(name, path) of the files one source reads, in reading order."""
    path = Path(s.path)
    if not path.exists():
        raise IngestError(f"ingest source {path}: no such file or folder")
    if path.is_file():
        return [(path.name, path)]
    if (s.format if s.format != "auto" else _detect(path)) == "datasets":
        return folder_files(path)
    return [(f.relative_to(path).as_posix(), f) for f in sorted(path.glob(s.glob)) if f.is_file()]


def run_ingest(
    cfg: IngestConfig,
    model: ModelSpec | ModelSource,
    store: ArtifactStore,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> ArtifactRef:
    """Read every source, tokenize with the model's tokenizer, write `documents` in parts."""
    src = model if isinstance(model, ModelSource) else resolve(model)
    if not cfg.sources:
        raise IngestError("ingest.sources is empty: name at least one file or folder")
    for s in cfg.sources:  # fail before any work on a missing path
        if not Path(s.path).exists():
            raise IngestError(f"ingest source {s.path}: no such file or folder")

    def body(w: StageWriter) -> None:
        tok = load_tokenizer(src)
        policy = token_policy(tok)
        ends_table = sentence_end_table(tok)
        seen: set[str] = set()
        shard, part, n_docs, n_tokens, dropped = [], 0, 0, 0, {"short": 0, "duplicate": 0}
        with progress_bar("ingest", runtime.progress, unit="docs") as bar:
            for source, text in iter_texts(cfg.sources):
                digest = hashlib.sha256(text.encode()).hexdigest()
                if cfg.dedup and digest in seen:
                    dropped["duplicate"] += 1
                    continue
                seen.add(digest)
                ids = np.asarray(encode(tok, text), dtype=np.int32)
                ends = sentence_ends(ids, ends_table)
                if cfg.max_tokens is not None and len(ids) > cfg.max_tokens:
                    ids, ends, text = _truncate(tok, ids, ends, cfg.max_tokens)
                if len(ids) < cfg.min_tokens:
                    dropped["short"] += 1
                    continue
                split = "heldout" if _unit(digest) < cfg.heldout_fraction else "train"
                shard.append((digest[:16], source, split, text, len(ids), ids, ends))
                n_docs += 1
                n_tokens += len(ids)
                bar.advance(1)
                if len(shard) == cfg.shard_size:
                    w.write_part("documents", part, _to_table(shard))
                    shard, part = [], part + 1
                if cfg.max_documents is not None and n_docs >= cfg.max_documents:
                    break
        if shard or part == 0:
            w.write_part("documents", part, _to_table(shard))
        if n_docs == 0:
            raise IngestError(
                "ingest produced no documents: every text was empty, shorter than "
                f"min_tokens={cfg.min_tokens} or a duplicate"
            )
        if corpus_identity(cfg.sources) != spec.inputs["corpus"]:
            raise IngestError("ingest sources changed while they were read: run again")
        w.info.update(documents=n_docs, tokens=n_tokens, dropped=dropped,
                      special_tokens=policy.as_info())

    spec = ingest_spec(cfg, src)
    return store.produce(spec, body)


def sentence_end_table(tok) -> np.ndarray:
    """Boolean per token id: does this token end a sentence?"""
    n = max(len(tok), max(tok.get_vocab().values()) + 1)
    table = np.zeros(n, dtype=bool)
    for tid in range(n):
        piece = tok.decode([tid])
        stripped = piece.rstrip(" \t")
        table[tid] = "\n" in piece or stripped.endswith(SENTENCE_END_CHARS)
    return table


def sentence_ends(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Exclusive end index of each sentence; the last sentence ends at len(ids)."""
    ends = np.flatnonzero(table[ids]) + 1
    if len(ids) and (len(ends) == 0 or ends[-1] != len(ids)):
        ends = np.append(ends, len(ids))
    # Merge runs of end tokens ("!!", ".\n\n") into the sentence they close.
    keep = np.ones(len(ends), dtype=bool)
    keep[:-1] = np.diff(ends) > 1
    return ends[keep].astype(np.int32) if len(ends) > 1 else ends.astype(np.int32)


def _truncate(tok, ids: np.ndarray, ends: np.ndarray, limit: int):
    cut = ends[ends <= limit]
    n = int(cut[-1]) if len(cut) else limit
    ids = ids[:n]
    ends = ends[ends < n]
    ends = np.append(ends, n).astype(np.int32)
    return ids, ends, tok.decode(ids.tolist(), skip_special_tokens=True)


def _unit(digest: str) -> float:
    return int(digest[:8], 16) / 0x1_0000_0000


def _to_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in DOCUMENTS_SCHEMA]
    arrays = [
        pa.array(cols[0], pa.string()),
        pa.array(cols[1], pa.string()),
        pa.array(cols[2], pa.string()),
        pa.array(cols[3], pa.large_string()),
        pa.array(cols[4], pa.int32()),
        pa.array([c.tolist() for c in cols[5]], pa.list_(pa.int32())),
        pa.array([c.tolist() for c in cols[6]], pa.list_(pa.int32())),
    ]
    return pa.Table.from_arrays(arrays, schema=DOCUMENTS_SCHEMA)


# --------------------------------------------------------------------------- readers


def iter_texts(sources: list[SourceSpec]) -> Iterator[tuple[str, str]]:
    """(source label, text) for every non-empty text of every source, in order."""
    for s in sources:
        for label, text in _read_source(s):
            if text.strip():
                yield label, text


def _read_source(s: SourceSpec) -> Iterator[tuple[str, str]]:
    path = Path(s.path)
    fmt = s.format if s.format != "auto" else _detect(path)
    if fmt == "jsonl":
        yield from _read_jsonl(path, s.text_field)
    elif fmt == "parquet":
        try:
            table = pq.read_table(path, columns=None)
        except (pa.ArrowInvalid, OSError) as e:
            raise IngestError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
        yield from _read_columnar(path, s.text_field, table)
    elif fmt == "datasets":
        yield from _read_datasets(path, s.text_field)
    elif path.is_dir():
        files = source_files(s)
        if not files:
            raise IngestError(f"ingest source {path}: no files match {s.glob!r}")
        for _, f in files:
            yield str(f), _read_text(f)
    else:
        yield str(path), _read_text(path)


def _detect(path: Path) -> str:
    if path.is_dir():
        return "datasets" if (path / "dataset_info.json").exists() or (path / "state.json").exists() else "text"
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(path.suffix, "text")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise IngestError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at "
                                  f"column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise IngestError(f"{path}:{lineno}: not valid JSON at column {e.colno}: "
                                  f"{e.msg.removesuffix(' at')}") from None
            if not isinstance(obj, dict) or field not in obj:
                raise IngestError(f"{path}:{lineno}: no field {field!r}")
            if not isinstance(obj[field], str):
                raise IngestError(f"{path}:{lineno}: field {field!r} is not a string")
            yield f"{path}:{lineno}", obj[field]


def _read_columnar(path: Path, field: str, table: pa.Table) -> Iterator[tuple[str, str]]:
    if field not in table.column_names:
        raise IngestError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)})")
    for i, text in enumerate(table.column(field).to_pylist()):
        if text is not None and not isinstance(text, str):
            raise IngestError(f"{path}: row {i}: column {field!r} is not a string")
        yield f"{path}#{i}", text or ""


def _read_datasets(path: Path, field: str) -> Iterator[tuple[str, str]]:
    """A folder written by `datasets.Dataset.save_to_disk` (Arrow stream files)."""
    files = sorted(path.glob("data-*.arrow")) or sorted(path.glob("*.arrow"))
    if not files:
        raise IngestError(f"{path}: no .arrow files (not a saved `datasets` folder)")
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                try:
                    table = ipc.open_stream(src).read_all()
                except pa.ArrowInvalid:
                    table = ipc.open_file(src).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise IngestError(f"{f}: not a readable Arrow file ({_first_line(e)})") from None
        yield from _read_columnar(f, field, table)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
