"""Inputs of a run: their content is part of the key (issue 14, finding 2), and bad input
is named and never retried (finding 4, library side; the CLI side is in test_cli_runs)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longrecipe import digest
from longrecipe.config import IngestConfig, ModelSpec, SourceSpec
from longrecipe.errors import InputError
from longrecipe.ingest import IngestError, ingest_spec, run_ingest
from longrecipe.models import ModelError, resolve
from tasks.common import retry_unless_bad_input, stage_cache_key
from tests.conftest import QUIET, write_corpus


def test_finding_2_editing_the_corpus_reruns_ingest_and_what_follows(tmp_path, store, tiny_spec, monkeypatch):
    """Finding 2: shrink or edit a JSONL file (same path) and ingest recomputes with the new
    documents; its key, the Prefect cache key and the next stage's key all change. An
    unchanged file is not re-read to find that out."""
    from longrecipe.analyze import analyze_spec
    from longrecipe.config import AnalyzeConfig
    from tasks.stages import _ingest_spec

    corpus = write_corpus(tmp_path, n_docs=6, sentences=10)
    cfg = IngestConfig(sources=[SourceSpec(path=str(corpus))], shard_size=4)
    first = run_ingest(cfg, tiny_spec, store, QUIET)
    assert first.info["documents"] == 6
    key_fn = stage_cache_key(_ingest_spec)
    params = {"cfg": cfg, "model": tiny_spec, "store": store.root}
    assert key_fn(None, params) == f"ingest-{first.key}"

    hashed = []
    real = digest.sha256_file
    monkeypatch.setattr(digest, "sha256_file", lambda p, *a, **k: hashed.append(p) or real(p, *a, **k))
    assert run_ingest(cfg, tiny_spec, store, QUIET).key == first.key
    assert hashed == []  # unchanged: a stat, not a read

    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[:3]))  # shrunk in place
    second = run_ingest(cfg, tiny_spec, store, QUIET)
    assert second.key != first.key and second.info["documents"] == 3
    assert key_fn(None, params) == f"ingest-{second.key}"
    src = resolve(tiny_spec)
    assert analyze_spec(AnalyzeConfig(), second, src).key != analyze_spec(AnalyzeConfig(), first, src).key

    text = corpus.read_text()
    corpus.write_text(text.replace("a", "b", 1))  # same size, other bytes
    assert ingest_spec(cfg, src).key not in (first.key, second.key)

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("One sentence here. And another one.")
    fcfg = IngestConfig(sources=[SourceSpec(path=str(folder), glob="*.txt")])
    k1 = ingest_spec(fcfg, src).key
    (folder / "b.txt").write_text("A new file in the folder.")
    assert ingest_spec(fcfg, src).key != k1
    (folder / "notes.md").write_text("not matched by the glob")
    k2 = ingest_spec(fcfg, src).key
    (folder / "notes.md").write_text("edited, still not matched")
    assert ingest_spec(fcfg, src).key == k2


def _ingest_error(tmp_path, store, tiny_spec, path, **kw) -> str:
    cfg = IngestConfig(sources=[SourceSpec(path=str(path), **kw)])
    with pytest.raises(IngestError) as err:
        run_ingest(cfg, tiny_spec, store, QUIET)
    assert store.get("ingest", ingest_spec(cfg, resolve(tiny_spec)).key) is None
    return str(err.value)


def test_finding_4_bad_input_names_file_and_line_and_is_never_retried(tmp_path, store, tiny_spec):
    """Finding 4 (library side): non-UTF-8 bytes in JSONL, a 0-byte Parquet file, a broken
    config.json and a .gguf that is not GGUF are bad input naming the file (and line); the
    malformed-JSON message is whole; none of them, and no full disk, is retried."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine. ok."}\n{"text": "caf\xe9 au lait"}\n')
    msg = _ingest_error(tmp_path, store, tiny_spec, bad)
    assert msg == f"{bad}:2: not UTF-8 (byte 0xe9 at column 14)"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine."}\n{"text": "tab\there"}\n')
    msg = _ingest_error(tmp_path, store, tiny_spec, broken)
    assert msg == f"{broken}:2: not valid JSON at column 14: Invalid control character"
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    msg = _ingest_error(tmp_path, store, tiny_spec, empty)
    assert msg.startswith(f"{empty}: not a readable Parquet file") and "0 bytes" in msg
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "cut.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "cut.parquet").read_bytes()[:-9])
    assert "not a readable Parquet file" in _ingest_error(tmp_path, store, tiny_spec, tmp_path / "cut.parquet")

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')
    with pytest.raises(ModelError, match=rf"{model}/config.json:2:21: not valid JSON: Expecting property name"):
        resolve(ModelSpec(source=str(model)))
    (model / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ModelError, match="must hold a JSON object"):
        resolve(ModelSpec(source=str(model)))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ModelError, match=rf"{fake}: not a GGUF file"):
        resolve(ModelSpec(source=str(fake)))

    from longrecipe.errors import DiskFullError

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self, raise_on_failure=True):
            raise self.exc

    for exc in (IngestError("x"), ModelError("x"), InputError("x"), DiskFullError("/s/p"),
                OSError(28, "No space left on device")):
        assert retry_unless_bad_input(None, None, State(exc)) is False, exc
