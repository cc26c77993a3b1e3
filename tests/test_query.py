"""`longrecipe query` and `longrecipe artifacts`: views over every version, read-only."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from longrecipe.artifacts import StageSpec
from longrecipe.query import QueryError, run_query, write_result


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "longrecipe", *args], capture_output=True, text=True, cwd=cwd)


def test_views_over_every_version_with_stage_and_key(store, documents):
    import pyarrow as pa

    other = store.produce(StageSpec("ingest", "test_v0", {"other": 1}, {}),
                          lambda w: w.write_table("documents", pa.table({"doc_id": ["z"], "n_tokens": [1]})))
    t = run_query(store, "SELECT key, count(*) n FROM documents GROUP BY key ORDER BY n")
    assert t.to_pylist() == [{"key": other.key, "n": 1}, {"key": documents.key, "n": 12}]
    t = run_query(store, "SELECT DISTINCT stage FROM documents")
    assert t.column("stage").to_pylist() == ["ingest"]
    a = run_query(store, "SELECT key, config->>'$.shard_size' AS shard, "
                         "(tables->'$.documents'->>'$.rows')::INT AS rows FROM artifacts WHERE key = ?".replace("?", f"'{documents.key}'"))
    assert a.to_pylist() == [{"key": documents.key, "shard": "5", "rows": 12}]


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO '{root}/ingest/x.csv'",
    "COPY documents TO '{root}/leak.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '{root}/exported'",
    "ATTACH '{root}/x.duckdb' AS x",
    "CREATE TABLE t AS SELECT 1",
    "SET lock_configuration = false",
    "SELECT 1; COPY (SELECT 1) TO '{root}/y.csv'",
    "INSTALL httpfs",
])
def test_statements_that_could_write_are_refused(store, documents, sql):
    before = sorted(p for p in store.fs.find(store.root))
    with pytest.raises(QueryError, match="refused"):
        run_query(store, sql.format(root=store.root))
    assert sorted(p for p in store.fs.find(store.root)) == before


def test_output_formats_and_out_inside_store_refused(tmp_path, store, documents):
    t = run_query(store, "SELECT doc_id, n_tokens, sentence_ends FROM documents ORDER BY doc_id LIMIT 2")
    csv = write_result(t, "csv", None, store)
    assert csv.splitlines()[0] == '"doc_id","n_tokens","sentence_ends"' and "[" in csv
    js = json.loads(write_result(t, "json", None, store))
    assert len(js) == 2 and isinstance(js[0]["sentence_ends"], list)
    text = write_result(t, "table", None, store)
    assert "doc_id" in text and "(2 rows)" in text
    out = tmp_path / "r.parquet"
    write_result(t, "parquet", str(out), store)
    assert pq.read_table(out).num_rows == 2
    with pytest.raises(QueryError, match="inside the store"):
        write_result(t, "csv", f"{store.root}/ingest/x.csv", store)


def test_cli_query_artifacts_and_exit_codes(tmp_path, store, documents):
    root = store.root
    r = _cli("query", "SELECT count(*) AS n FROM documents", "--store", root, "--format", "csv")
    assert r.returncode == 0 and r.stdout.split() == ['"n"', "12"]
    r = _cli("query", f"COPY documents TO '{root}/x.csv'", "--store", root)
    assert r.returncode == 2 and "refused" in r.stderr
    r = _cli("query", "SELECT * FROM no_such_table", "--store", root)
    assert r.returncode == 2 and "no_such_table" in r.stderr
    r = _cli("artifacts", "ls", "--store", root)
    assert r.returncode == 0 and documents.key in r.stdout and "documents=12" in r.stdout
    r = _cli("artifacts", "show", documents.key[:6], "--store", root)
    assert r.returncode == 0 and json.loads(r.stdout)["key"] == documents.key
    r = _cli("artifacts", "verify", "--store", root)
    assert r.returncode == 0 and "ok" in r.stdout
    part = documents.path / "documents" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    r = _cli("artifacts", "verify", documents.key, "--store", root)
    assert r.returncode == 1 and "sha256 differs" in r.stdout
    (documents.path.parent / "0000000000000000.tmp-x").mkdir()
    r = _cli("artifacts", "gc", "--store", root)
    assert r.returncode == 0 and "0000000000000000.tmp-x" in r.stdout
    r = _cli("artifacts", "show", "zzzz", "--store", root)
    assert r.returncode == 2
    r = _cli("run", str(tmp_path / "missing.yaml"), "--store", root)
    assert r.returncode == 2 and "missing.yaml" in r.stderr
