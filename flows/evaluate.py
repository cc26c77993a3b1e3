"""Evaluate-only: run the `evaluate` section of a recipe on any local model folders
(or GGUF files), without training anything."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from longrecipe.artifacts import ArtifactStore
from longrecipe.config import ModelSpec, RuntimeConfig, load_config
from tasks import publish, stages


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
    """Evaluate local models with a recipe's evaluate section, without training anything.

    Held-out documents (perplexity, retention, the corpus haystack) come from the
    recipe's ingest section.

    Args:
        config: Recipe file (YAML) whose `evaluate` section is run, e.g. configs/demo.yaml.
        models: Model folders or .gguf files (on the worker's file system); `tiny` for the preset.
        overrides: Fields to change, each `key.path=value`, e.g. ["evaluate.lengths=[256, 512]"].
        store: Artifact store root; empty: the worker's LONGRECIPE_STORE, else data/artifacts.
        device: Where models run: auto (CUDA when there is one), cpu or cuda.
    """
    cfg = load_config(config, overrides or [])
    root = ArtifactStore(store).root
    runtime = RuntimeConfig(device=device)
    t = stages.for_store(root)
    needs_docs = any(s in cfg.evaluate.suites for s in ("perplexity", "retention")) or cfg.evaluate.haystack == "corpus"
    documents = (t["ingest"](cfg.ingest, cfg.model, store=root, runtime=runtime,
                             about=publish.about(cfg.name, cfg.model.source))
                 if needs_docs else None)
    specs = {Path(m).stem if m != "tiny" else "tiny": ModelSpec(source=m) for m in models}
    label = ", ".join(specs)
    return t["evaluate"](cfg.evaluate, specs, documents, store=root, runtime=runtime,
                         about=publish.about(cfg.name, label, label))
