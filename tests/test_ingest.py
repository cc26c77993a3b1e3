"""Corpus ingest: every source format, sentence ends, dedup, splits, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from longrecipe import IngestConfig, IngestError, SourceSpec, run_ingest
from longrecipe.ingest import sentence_end_table, sentence_ends
from longrecipe.models import byte_tokenizer
from tests.conftest import QUIET

TEXTS = ["One fish. Two fish! Red fish?\nBlue fish.", "A second text, with 42 words. The end.", "x"]


def _run(store, tiny_spec, sources, **kw):
    return run_ingest(IngestConfig(sources=sources, **kw), tiny_spec, store, QUIET)


def test_jsonl_documents_table(tmp_path, store, tiny_spec):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS + [TEXTS[0]]) + "\n")
    ref = _run(store, tiny_spec, [SourceSpec(path=str(p))], min_tokens=2)
    rows = ref.read_table("documents").to_pylist()
    assert [r["text"] for r in rows] == TEXTS[:2]  # "x" too short, duplicate dropped
    assert ref.info["dropped"] == {"short": 1, "duplicate": 1}
    r = rows[0]
    tok = byte_tokenizer()
    assert r["input_ids"] == tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert r["n_tokens"] == len(r["input_ids"])
    sentences = [tok.decode(r["input_ids"][a:b]) for a, b in zip([0] + r["sentence_ends"][:-1], r["sentence_ends"], strict=True)]
    assert sentences == ["One fish.", " Two fish!", " Red fish?\n", "Blue fish."]
    assert r["source"] == f"{p}:1"


def test_parquet_text_dir_and_datasets_folder(tmp_path, store, tiny_spec):
    pq.write_table(pa.table({"body": TEXTS[:2]}), tmp_path / "a.parquet")
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text(TEXTS[0])
    (d / "sub" / "c.txt").write_text(TEXTS[1] + " More.")
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "state.json").write_text("{}")
    table = pa.table({"text": ["From a datasets folder. Yes."]})
    with ipc.new_stream(str(ds / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    ref = _run(store, tiny_spec, [
        SourceSpec(path=str(tmp_path / "a.parquet"), text_field="body"),
        SourceSpec(path=str(d)),
        SourceSpec(path=str(ds)),
    ])
    texts = ref.read_table("documents").column("text").to_pylist()
    assert texts == [TEXTS[0], TEXTS[1], TEXTS[1] + " More.", "From a datasets folder. Yes."]


@pytest.mark.parametrize(
    "content,field,msg",
    [
        ('{"text": "ok"}\n{not json}\n', "text", r"a.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', "text", r"a.jsonl:2: no field 'text'"),
        ('{"text": 5}\n', "text", r"a.jsonl:1: field 'text' is not a string"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, store, tiny_spec, content, field, msg):
    p = tmp_path / "a.jsonl"
    p.write_text(content)
    with pytest.raises(IngestError, match=msg):
        _run(store, tiny_spec, [SourceSpec(path=str(p), text_field=field)])
    assert list(store.iter_refs()) == []


def test_missing_source_and_empty_result(tmp_path, store, tiny_spec):
    with pytest.raises(IngestError, match="no such file"):
        _run(store, tiny_spec, [SourceSpec(path=str(tmp_path / "nope.jsonl"))])
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(IngestError, match="no documents"):
        _run(store, tiny_spec, [SourceSpec(path=str(p))], min_tokens=100)
    assert list(store.iter_refs()) == []


def test_truncation_at_sentence_end_and_split_is_stable(tmp_path, store, tiny_spec, documents):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"text": "Aaaa. Bbbb. Cccc. Dddd."}) + "\n")
    ref = _run(store, tiny_spec, [SourceSpec(path=str(p))], max_tokens=13)
    r = ref.read_table("documents").to_pylist()[0]
    assert r["text"] == "Aaaa. Bbbb." and r["n_tokens"] == 11 and r["sentence_ends"] == [5, 11]
    splits = documents.read_table("documents").column("split").to_pylist()
    assert set(splits) == {"train", "heldout"}
    assert documents.manifest["tables"]["documents"]["parts"] == 3  # 12 docs, shards of 5


def test_sentence_end_runs_merge():
    table = np.zeros(300, dtype=bool)
    table[[ord("."), ord("!")]] = True
    ids = np.array([ord(c) for c in "ab!! cd. e"])
    assert sentence_ends(ids, table).tolist() == [4, 8, 10]
    tok = byte_tokenizer()
    table = sentence_end_table(tok)
    assert table[tok.convert_tokens_to_ids("?")] and not table[tok.convert_tokens_to_ids("a")]
