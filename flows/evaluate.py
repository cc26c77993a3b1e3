"""Evaluate-only: run the `evaluate` section of a recipe on any local model folders
(or GGUF files), without training anything."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from longrecipe.artifacts import ArtifactStore
from longrecipe.config import ModelSpec, RuntimeConfig, load_config
from tasks import stages


def _run_name() -> str:
    p = flow_run.parameters
    return "evaluate " + ", ".join(Path(m).name for m in p.get("models") or [])


@flow(name="longrecipe-evaluate", flow_run_name=_run_name, log_prints=True)
def evaluate_models(
    config: str,
    models: list[str],
    overrides: list[str] | None = None,
    store: str | None = None,
    device: str = "auto",
) -> dict:
    """Evaluate MODELS (local folders or .gguf files; `tiny` for the preset) with CONFIG's
    evaluate section; held-out documents come from CONFIG's ingest section."""
    cfg = load_config(config, overrides or [])
    root = ArtifactStore(store).root
    runtime = RuntimeConfig(device=device)
    t = stages.for_store(root)
    needs_docs = any(s in cfg.evaluate.suites for s in ("perplexity", "retention")) or cfg.evaluate.haystack == "corpus"
    documents = t["ingest"](cfg.ingest, cfg.model, store=root, runtime=runtime) if needs_docs else None
    specs = {Path(m).stem if m != "tiny" else "tiny": ModelSpec(source=m) for m in models}
    return t["evaluate"](cfg.evaluate, specs, documents, store=root, runtime=runtime)
