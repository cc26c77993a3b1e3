"""Read-only SQL over the store: one DuckDB view per table plus `artifacts`.

Each table view unions that table over every finished artifact (every
version), with `stage` and `key` columns in front. The `artifacts` view has
one row per manifest. Two layers keep a query from writing or reading where
it should not:

- a statement allow-list: only reads run (SELECT, and DESCRIBE / SHOW /
  SUMMARIZE, which DuckDB parses as SELECT; EXPLAIN of such a statement).
  Anything else is refused before it runs: COPY, EXPORT/IMPORT DATABASE,
  ATTACH, CREATE, SET, PRAGMA (PRAGMA import_database runs a folder's
  schema.sql), CALL, LOAD, INSTALL, and EXPLAIN ANALYZE of any of them (it
  executes the statement);
- DuckDB's own sandbox: external access off, files readable only under the
  store root (resolved: a symlinked root or a link out of the store gives no
  way out), extensions neither installed nor loaded, spills in a private temp
  folder, and the configuration locked so no statement can undo it.

When the views are made, the table files of every artifact are checked like
a cache hit (manifest, sizes, mtimes; a file whose mtime differs is hashed):
an artifact that does not match is left out of the views, and a query that
names one of its tables is refused with the artifact's name. `artifacts
verify` is the deep check (it rereads every byte).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa

from longrecipe.artifacts import ArtifactError, ArtifactRef, ArtifactStore
from longrecipe.errors import InputError

# Statement types that only read; EXPLAIN is accepted when what it explains is one of them.
_READ_ONLY = {"SELECT"}


class QueryError(InputError):
    """A statement that is refused or fails."""


class StaleArtifact(ArtifactError):
    """An artifact behind a view whose files no longer match its manifest."""


def connect(store: ArtifactStore) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the store's views, sandboxed to reading the store.
    Artifacts whose files no longer match their manifest are left out of the views."""
    return _connect(store)[0]


def _connect(store: ArtifactStore) -> tuple[duckdb.DuckDBPyConnection, str, dict[str, list[str]]]:
    """The connection, its spill folder, and per table the artifacts left out (why)."""
    con = duckdb.connect(":memory:")
    root = os.path.realpath(store.root) if store.is_local else store.root
    spill = tempfile.mkdtemp(prefix="longrecipe-query-")
    try:
        if not store.is_local:
            con.register_filesystem(store.fs)
        con.execute(f"SET temp_directory = {_sql_str(spill)}")
        con.execute(f"SET allowed_directories = [{_sql_str(root.rstrip('/') + '/')}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        refs = list(store.iter_refs())
        _artifacts_view(con, refs)
        by_table: dict[str, list[ArtifactRef]] = {}
        stale: dict[str, list[str]] = {}
        for ref in refs:
            for table in ref.tables():
                if problems := store.check(ref, table):
                    stale.setdefault(table, []).append(
                        f"artifact {ref.stage}/{ref.key} ({ref.uri}): {'; '.join(problems)}")
                else:
                    by_table.setdefault(table, []).append(ref)
        for table, trefs in sorted(by_table.items()):
            selects = []
            for ref in trefs:
                files = ", ".join(_sql_str(_real(f, store)) for f in ref.files(table))
                selects.append(
                    f"SELECT {_sql_str(ref.stage)} AS stage, {_sql_str(ref.key)} AS key, * "
                    f"FROM read_parquet([{files}])"
                )
            con.execute(f'CREATE VIEW "{table}" AS ' + " UNION ALL BY NAME ".join(selects))
        # Nothing below may change settings (e.g. re-enable external access): lock them.
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
        raise
    return con, spill, stale


def run_query(store: ArtifactStore, sql: str) -> pa.Table:
    """Run one or more reading statements; the result of the last one as an Arrow table."""
    con, spill, stale = _connect(store)
    try:
        statements = _reading_statements(con, sql)
        _refuse_stale(stale, sql)
        result = None
        try:
            for st in statements:
                rel = con.sql(st.query)
                result = rel.to_arrow_table() if rel is not None else pa.table({})
        except duckdb.Error as e:
            raise QueryError(str(e).splitlines()[0]) from None
        return result
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def _reading_statements(con: duckdb.DuckDBPyConnection, sql: str) -> list:
    """The statements of `sql`, each checked to be a read; the first that is not is refused."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"cannot parse the query: {str(e).splitlines()[0]}") from None
    if not statements:
        raise QueryError("empty query")
    for st in statements:
        kind = _kind(con, st)
        if kind not in _READ_ONLY:
            raise QueryError(
                f"refused: {kind} statements are not allowed; `longrecipe query` only reads "
                "(write results elsewhere with --out FILE)"
            )
    return statements


def _kind(con: duckdb.DuckDBPyConnection, st) -> str:
    """A statement's type; for EXPLAIN [ANALYZE], the type of what it explains (EXPLAIN
    ANALYZE executes its statement, so `EXPLAIN ANALYZE COPY ...` is a COPY)."""
    kind = st.type.name
    if kind != "EXPLAIN":
        return kind
    inner = re.sub(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", "", st.query, count=1, flags=re.IGNORECASE)
    try:
        inner_st = con.extract_statements(inner)
    except duckdb.Error:
        return "EXPLAIN (of a statement that is not a plain read)"
    if len(inner_st) != 1 or inner_st[0].type.name not in _READ_ONLY:
        return "EXPLAIN " + (inner_st[0].type.name if len(inner_st) == 1 else "(several statements)")
    return inner_st[0].type.name


def _refuse_stale(stale: dict[str, list[str]], sql: str) -> None:
    """Refuse a query that reads a table of an artifact whose files no longer match its
    manifest. A table counts as read when the query names it (a column of the same name
    also counts: the check only errs on the side of refusing)."""
    words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql)}
    for table, why in sorted(stale.items()):
        if table.lower() in words:
            raise StaleArtifact(
                f"table {table}: {why[0]} no longer matches its manifest"
                + (f" (and {len(why) - 1} more)" if len(why) > 1 else "")
                + ". Refused to read it; `longrecipe artifacts verify` checks every artifact, "
                "and the next `longrecipe run` recomputes this one"
            )


def write_result(table: pa.Table, fmt: str, out: str | None, store: ArtifactStore) -> str | None:
    """Render a result as table/csv/json/parquet to a file or return text for stdout."""
    if out is not None and store.is_local:
        target = Path(os.path.realpath(out))
        root = Path(os.path.realpath(store.root))
        if target == root or root in target.parents:
            raise QueryError(f"refused: --out {out} is inside the store {store.root}")
    if fmt == "parquet":
        if out is None:
            raise QueryError("--format parquet needs --out FILE")
        import pyarrow.parquet as pq

        pq.write_table(table, out)
        return None
    if fmt == "csv":
        text = _to_csv(table)
    elif fmt == "json":
        text = json.dumps(table.to_pylist(), default=str, indent=1)
    elif fmt == "table":
        text = _to_text_table(table)
    else:
        raise QueryError(f"unknown format {fmt!r}: table, csv, json or parquet")
    if out is None:
        return text
    Path(out).write_text(text)
    return None


def _real(path: str, store: ArtifactStore) -> str:
    return os.path.realpath(path) if store.is_local else path


def _artifacts_view(con: duckdb.DuckDBPyConnection, refs: list[ArtifactRef]) -> None:
    rows = []
    for r in refs:
        m = r.manifest
        rows.append(
            {
                "stage": r.stage,
                "key": r.key,
                "stage_version": m.get("stage_version"),
                "created_at": m.get("created_at"),
                "seconds": (m.get("timings") or {}).get("seconds"),
                "code_version": m.get("code_version"),
                "inputs": json.dumps(m.get("inputs", {}), sort_keys=True),
                "config": json.dumps(m.get("config"), sort_keys=True),
                "tables": json.dumps(m.get("tables", {}), sort_keys=True),
                "info": json.dumps(m.get("info", {}), sort_keys=True),
                "files": len(m.get("files", [])),
                "bytes": sum(f["size"] for f in m.get("files", [])),
                "path": r.uri,
            }
        )
    schema = pa.schema(
        [
            ("stage", pa.string()), ("key", pa.string()), ("stage_version", pa.string()),
            ("created_at", pa.string()), ("seconds", pa.float64()), ("code_version", pa.string()),
            ("inputs", pa.string()), ("config", pa.string()), ("tables", pa.string()),
            ("info", pa.string()), ("files", pa.int64()), ("bytes", pa.int64()), ("path", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    con.register("_artifacts_arrow", table)
    # JSON columns typed as JSON so `config->>'$.method'` works.
    con.execute(
        "CREATE VIEW artifacts AS SELECT stage, key, stage_version, "
        "CAST(created_at AS TIMESTAMPTZ) AS created_at, seconds, code_version, "
        "CAST(inputs AS JSON) AS inputs, CAST(config AS JSON) AS config, "
        "CAST(tables AS JSON) AS tables, CAST(info AS JSON) AS info, files, bytes, path "
        "FROM _artifacts_arrow"
    )


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _cell(v, width: int = 60) -> str:
    s = "NULL" if v is None else str(v)
    s = s.replace("\n", "\\n")
    return s if len(s) <= width else s[: width - 1] + "…"


def _to_text_table(table: pa.Table, max_rows: int = 200) -> str:
    names = table.column_names
    rows = table.slice(0, max_rows).to_pylist()
    cells = [[_cell(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    line = "  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    more = table.num_rows - len(rows)
    out.append(f"({table.num_rows} rows" + (f", {more} not shown; use --format csv" if more else "") + ")")
    return "\n".join(out)


def _to_csv(table: pa.Table) -> str:
    import io

    import pyarrow.csv as pacsv

    # CSV cannot hold lists: render nested columns as JSON text.
    cols = []
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_struct(col.type):
            col = pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string())
        cols.append(col)
    buf = io.BytesIO()
    pacsv.write_csv(pa.Table.from_arrays(cols, names=table.column_names), buf)
    return buf.getvalue().decode()

