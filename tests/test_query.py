"""`longrecipe query` and `longrecipe artifacts`: views over every version, read-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import duckdb
import pyarrow.parquet as pq
import pytest

from longrecipe.artifacts import ArtifactStore, StageSpec
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


def _snapshot(root) -> dict:
    """Every file and folder under the store with its size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def _import_dir(tmp_path, target):
    """A folder IMPORT DATABASE would run: its schema.sql holds a COPY into `target`."""
    d = tmp_path / "import"
    d.mkdir(exist_ok=True)
    (d / "schema.sql").write_text(f"COPY (SELECT 1 AS a) TO '{target}' (FORMAT csv);\n")
    (d / "load.sql").write_text("")
    return d


FINDING_1_ATTACKS = {
    "explain_analyze_copy_over_a_part": "EXPLAIN ANALYZE COPY (SELECT * FROM documents) TO "
                                        "'{part}' (FORMAT parquet)",
    "explain_analyze_copy_partitioned_overwrite": "EXPLAIN ANALYZE COPY (SELECT 1 a, 1 p) TO "
                                                  "'{root}/train' (FORMAT parquet, PARTITION_BY (p), OVERWRITE)",
    "explain_copy": "EXPLAIN COPY (SELECT 1) TO '{root}/x.csv'",
    "pragma_import_database": "PRAGMA import_database('{imp}')",
    "import_database": "IMPORT DATABASE '{imp}'",
    "read_outside_the_store": "SELECT content FROM read_text('/etc/passwd')",
    "read_outside_via_dotdot": "SELECT content FROM read_text('{root}/../outside.txt')",
    "glob_outside_the_store": "SELECT * FROM glob('/etc/*')",
}
OTHER_NON_READS = {  # refused before this issue too; kept refused
    "attach_outside": "SELECT 1; ATTACH '{tmp}/x.duckdb' AS x",
    "call_pragma": "CALL pragma_version()",
    "pivot": "PIVOT documents ON split USING count(*)",
}


@pytest.mark.parametrize("attack", sorted(FINDING_1_ATTACKS))
def test_finding_1_query_never_writes_and_reads_only_the_store(tmp_path, store, documents, attack):
    """Finding 1: each statement is refused, and nothing in the store (or next to it) changes."""
    _refused_and_nothing_changes(tmp_path, store, documents, FINDING_1_ATTACKS[attack])


@pytest.mark.parametrize("attack", sorted(OTHER_NON_READS))
def test_other_statements_that_are_not_reads_stay_refused(tmp_path, store, documents, attack):
    _refused_and_nothing_changes(tmp_path, store, documents, OTHER_NON_READS[attack])


def _refused_and_nothing_changes(tmp_path, store, documents, template):
    part = documents.path / "documents" / "part-00000.parquet"
    (tmp_path / "outside.txt").write_text("secret")
    imp = _import_dir(tmp_path, tmp_path / "imported.csv")
    sql = template.format(part=part, root=store.root, imp=imp, tmp=tmp_path)
    before = _snapshot(store.root)
    with pytest.raises(QueryError) as err:
        run_query(store, sql)
    assert "refused" in str(err.value) or "disabled by configuration" in str(err.value)
    assert _snapshot(store.root) == before
    assert not (tmp_path / "imported.csv").exists() and not (tmp_path / "x.duckdb").exists()


def test_finding_1_sandbox_holds_without_the_allow_list(tmp_path, store, documents):
    """Finding 1, second layer: on the connection itself (no statement check), reads outside
    the store, IMPORT DATABASE, extensions and re-opening the sandbox all fail."""
    from longrecipe.query import connect

    imp = _import_dir(tmp_path, tmp_path / "imported.csv")
    con = connect(store)
    for sql in ("SELECT content FROM read_text('/etc/passwd')", f"IMPORT DATABASE '{imp}'",
                f"PRAGMA import_database('{imp}')", "INSTALL httpfs", "LOAD httpfs",
                "SET enable_external_access = true", "SET allowed_directories = ['/']",
                "RESET lock_configuration"):
        with pytest.raises(duckdb.Error):
            con.execute(sql).fetchall()
    assert con.execute("SELECT count(*) FROM documents").fetchone() == (12,)
    assert not (tmp_path / "imported.csv").exists()
    con.close()
    # reads are fine: SELECT, DESCRIBE, SUMMARIZE, EXPLAIN (ANALYZE) of a SELECT
    for sql in ("DESCRIBE documents", "SUMMARIZE documents", "EXPLAIN SELECT * FROM documents",
                "EXPLAIN ANALYZE SELECT count(*) FROM documents", "SHOW TABLES"):
        assert run_query(store, sql).num_rows >= 1, sql


def test_finding_1_out_into_a_symlinked_store_is_refused(tmp_path, documents):
    """Finding 1: --out is compared on resolved paths (a store reached through a link)."""
    link = tmp_path / "link"
    link.symlink_to(documents.path.parents[1])
    linked = ArtifactStore(link)
    t = run_query(linked, "SELECT count(*) AS n FROM documents")
    assert t.to_pylist() == [{"n": 12}]
    for out in (documents.path.parents[1] / "x.csv", link / "ingest" / "x.csv", tmp_path / "link" / "y.csv"):
        with pytest.raises(QueryError, match="inside the store"):
            write_result(t, "csv", str(out), linked)
    aside = tmp_path / "aside"
    aside.symlink_to(documents.path.parent)  # a link outside that points into the store
    with pytest.raises(QueryError, match="inside the store"):
        write_result(t, "csv", str(aside / "z.csv"), ArtifactStore(documents.path.parents[1]))


def test_finding_6_query_refuses_an_artifact_that_no_longer_matches(tmp_path, store, documents):
    """Finding 6: a flipped byte is refused by name, before any row is served; a copy with
    other mtimes but the same bytes is accepted (hashed once); `artifacts` stays readable."""
    from longrecipe.query import StaleArtifact

    part = documents.path / "documents" / "part-00000.parquet"
    st = part.stat()
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    assert run_query(store, "SELECT count(*) AS n FROM documents").to_pylist() == [{"n": 12}]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    with pytest.raises(StaleArtifact, match=f"ingest/{documents.key}.*sha256 differs"):
        run_query(store, "SELECT count(*) FROM documents")
    assert run_query(store, "SELECT count(*) AS n FROM artifacts").to_pylist() == [{"n": 1}]
    r = _cli("query", "SELECT count(*) FROM documents", "--store", store.root)
    assert r.returncode == 1 and f"ingest/{documents.key}" in r.stderr and r.stdout == ""
    part.write_bytes(b"")  # a size that differs needs no hash at all
    with pytest.raises(StaleArtifact, match="size 0"):
        run_query(store, "SELECT * FROM documents")
