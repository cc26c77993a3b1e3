"""One thin Prefect task per stage. Each body: call the library's run_<stage> (its
progress also in the run log), publish its Prefect artifact (tasks/publish.py), return
the artifact as a small dict. `about` (recipe, method, model) only names the Prefect
artifact; it never enters a key."""

from __future__ import annotations

from prefect import task

from longrecipe.artifacts import ArtifactStore
from longrecipe.config import (
    AnalyzeConfig,
    AnnealConfig,
    BuildConfig,
    EvaluateConfig,
    IngestConfig,
    MergeConfig,
    ModelSpec,
    ReportConfig,
    RuntimeConfig,
    TrainConfig,
)
from longrecipe.models import resolve
from tasks.common import (
    RefDict,
    load_ref,
    maybe_fail,
    ref_dict,
    results_dir,
    stage_progress,
    stage_task_options,
)
from tasks.publish import About, publish_evaluation, publish_report, publish_summary

STAGES = ("ingest", "analyze", "build", "train", "anneal", "merge", "evaluate", "report")


def for_store(store: str) -> dict:
    """Every stage task, its Prefect results persisted beside the store's artifacts."""
    return {name: globals()[name].with_options(result_storage=results_dir(store)) for name in STAGES}


# -- ingest
def _ingest_spec(store, p):
    from longrecipe.ingest import ingest_spec

    return ingest_spec(p["cfg"], resolve(p["model"]))


@task(name="ingest", task_run_name="ingest", **stage_task_options(_ingest_spec))
def ingest(cfg: IngestConfig, model: ModelSpec, store: str, runtime: RuntimeConfig,
        about: About | None = None) -> RefDict:
    """Read and tokenize the corpus into `documents`."""
    from longrecipe.ingest import run_ingest

    maybe_fail("ingest", store)
    with stage_progress():
        ref = run_ingest(cfg, model, ArtifactStore(store), runtime)
    publish_summary(ref, about)
    return ref_dict(ref)


# -- analyze
def _analyze_spec(store, p):
    from longrecipe.analyze import analyze_spec, reference_source

    cfg = p["cfg"]
    reference = reference_source(cfg, load_ref(store, p.get("reference")))
    return analyze_spec(cfg, load_ref(store, p["documents"]), resolve(p["model"]), reference)


@task(name="analyze", task_run_name="analyze", **stage_task_options(_analyze_spec))
def analyze(cfg: AnalyzeConfig, documents: RefDict, model: ModelSpec, store: str, runtime: RuntimeConfig,
            reference: RefDict | None = None, about: About | None = None) -> RefDict:
    """Score tokens and flag impactful ones: token_scores, token_stats, sentences. `reference`
    is the trained H' of analyze.reference_training (the train task's artifact)."""
    from longrecipe.analyze import run_analyze

    maybe_fail("analyze", store)
    s = ArtifactStore(store)
    with stage_progress():
        ref = run_analyze(cfg, load_ref(s, documents), model, s, runtime,
                          reference=load_ref(s, reference))
    publish_summary(ref, about)
    return ref_dict(ref)


# -- build
def _build_spec(store, p):
    from longrecipe.build import build_spec

    return build_spec(p["cfg"], load_ref(store, p["documents"]), load_ref(store, p["analysis"]))


@task(name="build", task_run_name="build-{cfg.method}", **stage_task_options(_build_spec))
def build(cfg: BuildConfig, documents: RefDict, analysis: RefDict | None, store: str, runtime: RuntimeConfig,
        about: About | None = None) -> RefDict:
    """Make training samples with their position ids."""
    from longrecipe.build import run_build

    maybe_fail("build", store)
    s = ArtifactStore(store)
    with stage_progress():
        ref = run_build(cfg, load_ref(s, documents), load_ref(s, analysis), s, runtime)
    publish_summary(ref, about)
    return ref_dict(ref)


# -- train
def _train_spec(store, p):
    from longrecipe.train import train_spec

    return train_spec(p["cfg"], load_ref(store, p["samples"]), resolve(p["model"]),
                      load_ref(store, p.get("analysis")))


@task(name="train", task_run_name="train", **stage_task_options(_train_spec))
def train(cfg: TrainConfig, samples: RefDict, model: ModelSpec, store: str, runtime: RuntimeConfig,
          about: About | None = None, analysis: RefDict | None = None) -> RefDict:
    """Context-extension training on the samples (stage 0); `analysis` gives the LongCE
    loss weights when train.loss_weights is set."""
    from longrecipe.train import run_train

    maybe_fail("train", store)
    s = ArtifactStore(store)
    with stage_progress():
        ref = run_train(cfg, load_ref(s, samples), model, s, runtime, load_ref(s, analysis))
    publish_summary(ref, about)
    return ref_dict(ref)


# -- anneal
def _anneal_spec(store, p):
    from longrecipe.anneal import anneal_spec

    return anneal_spec(p["cfg"], load_ref(store, p["model"]), load_ref(store, p["replay"]))


@task(name="anneal", task_run_name="anneal", **stage_task_options(_anneal_spec))
def anneal(cfg: AnnealConfig, model: RefDict, replay: RefDict, store: str, runtime: RuntimeConfig,
        about: About | None = None) -> RefDict:
    """Anneal the trained model on replay data, learning rate to zero (stage 1)."""
    from longrecipe.anneal import run_anneal

    maybe_fail("anneal", store)
    s = ArtifactStore(store)
    with stage_progress():
        ref = run_anneal(cfg, load_ref(s, model), load_ref(s, replay), s, runtime)
    publish_summary(ref, about)
    return ref_dict(ref)


# -- merge
def _merge_spec(store, p):
    from longrecipe.merge import merge_spec

    return merge_spec(p["cfg"], resolve(p["original"]), load_ref(store, p["annealed"]))


@task(name="merge", task_run_name="merge", **stage_task_options(_merge_spec))
def merge(cfg: MergeConfig, original: ModelSpec, annealed: RefDict, store: str, runtime: RuntimeConfig,
        about: About | None = None) -> RefDict:
    """Average the original and annealed weights (stage 2)."""
    from longrecipe.merge import run_merge

    maybe_fail("merge", store)
    s = ArtifactStore(store)
    with stage_progress():
        ref = run_merge(cfg, original, load_ref(s, annealed), s, runtime)
    publish_summary(ref, about)
    return ref_dict(ref)


# -- evaluate
def _models(store, models: dict) -> dict:
    """Labels to models: a RefDict (a model artifact) or a ModelSpec."""
    return {k: (load_ref(store, v) if isinstance(v, dict) and "key" in v else v) for k, v in models.items()}


def _evaluate_spec(store, p):
    from longrecipe.evaluate import evaluate_spec

    models = {k: resolve(v) for k, v in _models(store, p["models"]).items()}
    return evaluate_spec(p["cfg"], models, load_ref(store, p["documents"]))


@task(name="evaluate", task_run_name="evaluate", **stage_task_options(_evaluate_spec))
def evaluate(cfg: EvaluateConfig, models: dict, documents: RefDict | None, store: str, runtime: RuntimeConfig,
        about: About | None = None) -> RefDict:
    """NIAH / RULER / perplexity / retention for each model."""
    from longrecipe.evaluate import run_evaluate

    maybe_fail("evaluate", store)
    s = ArtifactStore(store)
    with stage_progress():
        ref = run_evaluate(cfg, _models(s, models), s, runtime, documents=load_ref(s, documents))
    publish_evaluation(ref, about)
    return ref_dict(ref)


# -- report
def _report_spec(store, p):
    from longrecipe.report import report_spec

    evals = [load_ref(store, r) for r in p["evaluations"]]
    return report_spec(p["cfg"], evals, {k: load_ref(store, v) for k, v in p["trainings"].items()})


@task(name="report", task_run_name="report", **stage_task_options(_report_spec))
def report(cfg: ReportConfig, evaluations: list[RefDict], trainings: dict[str, RefDict], store: str,
           title: str = "longrecipe report", about: About | None = None) -> RefDict:
    """Scores and training costs: report.md with its figures, and report.html."""
    from longrecipe.report import run_report

    s = ArtifactStore(store)
    ref = run_report(cfg, [load_ref(s, r) for r in evaluations],
                     {k: load_ref(s, v) for k, v in trainings.items()}, s, title)
    publish_report(ref, about)
    return ref_dict(ref)
