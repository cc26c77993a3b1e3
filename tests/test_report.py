"""The report: figures linked by relative name (a copied store still shows them), one
self-contained HTML page, every model's heatmap in one figure, perplexity as a plot,
the at-a-glance table; and what Prefect's UI receives (no local file, names that say
what each artifact is)."""

from __future__ import annotations

import re
import shutil

import pytest

from longrecipe import ArtifactStore, load_config, replay_build_config, run_build, run_ingest
from longrecipe.anneal import run_anneal
from longrecipe.evaluate import run_evaluate
from longrecipe.merge import run_merge
from longrecipe.report import embedded_markdown, run_report, summary_text
from longrecipe.train import run_train
from tests.conftest import QUIET, ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """A miniature compare flow through the library: base, full and pose (+ anneal + merge)."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        "build.num_samples=2", "train.optim.max_steps=2", "train.optim.grad_accum=1",
        "anneal.optim.max_steps=1", "evaluate.suites=[niah, perplexity]", "evaluate.depths=2",
        "evaluate.max_documents=2", "evaluate.niah_max_new_tokens=4"])
    store = ArtifactStore(tmp / "store")
    docs = run_ingest(cfg.ingest, cfg.model, store, QUIET)
    evaluations = [run_evaluate(cfg.evaluate, {"base": cfg.model}, store, QUIET, documents=docs)]
    trainings = {}
    replay = run_build(replay_build_config(cfg), docs, None, store, QUIET)
    for method in ("full", "pose"):
        samples = run_build(cfg.build.model_copy(update={"method": method}), docs, None, store, QUIET)
        trainings[method] = run_train(cfg.train, samples, cfg.model, store, QUIET)
        merged = run_merge(cfg.merge, cfg.model, run_anneal(cfg.anneal, trainings[method], replay, store, QUIET),
                           store, QUIET)
        evaluations.append(run_evaluate(cfg.evaluate, {method: merged}, store, QUIET, documents=docs))
    report = run_report(cfg.report, evaluations, trainings, store, "tiny: method comparison")
    return tmp, store, report


def test_report_figures_are_relative_and_a_copied_store_still_resolves(comparison, tmp_path):
    tmp, store, report = comparison
    md = (report.path / "files" / "report.md").read_text()
    targets = LINK.findall(md)
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md)
    assert sorted(images) == ["heatmaps.png", "niah.png", "perplexity.png"]
    assert str(tmp) not in md and not any(t.startswith(("/", "file:")) for t in targets)
    # one heatmap figure for all models, none of the evaluations' own heatmap files
    assert "heatmap-" not in md and md.count("heatmaps.png") == 1
    copy = tmp_path / "moved"
    shutil.copytree(store.root, copy / "store")
    files = copy / "store" / "report" / report.key / "files"
    for t in targets:
        assert (files / t).exists(), f"{t} does not resolve in the copied store"
    assert any("/train/" in t for t in targets) and any("/merge/" in t and "model" in t for t in targets)


def test_html_page_embeds_every_figure_and_names_no_absolute_path(comparison):
    tmp, _, report = comparison
    page = (report.path / "files" / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert str(tmp) not in page and "file:" not in page
    assert re.search(r'href="/', page) is None
    assert "<table>" in page and "At a glance" in page


def test_at_a_glance_shows_each_model_and_cost_relative_to_full(comparison):
    _, store, report = comparison
    md = (report.path / "files" / "report.md").read_text()
    glance = md.split("## At a glance")[1].split("\n## ")[0]
    rows = [line for line in glance.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| model | NIAH 512 | NIAH 1,024 | ppl 1,024 | FLOPs vs full | time vs full |")
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert names == ["base", "full-length (FLT) + anneal + merge", "PoSE + anneal + merge"]
    assert rows[2].rstrip().endswith("| 1.00x | 1.00x |")
    pose_flops = float(rows[3].split("|")[-3].strip().rstrip("x"))
    assert 0 < pose_flops < 0.5  # 300-token samples against 1,024
    text = summary_text(report, store)
    assert "PoSE + anneal + merge" in text and "FLOPs vs full" in text


def test_prefect_report_markdown_references_no_local_file(comparison, monkeypatch):
    tmp, store, report = comparison
    sent = []
    monkeypatch.setattr("prefect.artifacts.create_markdown_artifact",
                        lambda md, key=None, description=None: sent.append((md, key, description)))
    from tasks.publish import about, publish_report

    publish_report(report, about("tiny", "tiny", "comparison"))
    (md, key, description), = sent
    targets = LINK.findall(md)
    assert len([t for t in targets if t.startswith("data:image/png;base64,")]) == 3
    assert all(t.startswith(("data:", "http://", "https://")) for t in targets), targets
    assert not re.search(r"\]\((?!data:|https?://)", md)
    assert "In the store:" in md and "links relative" not in md  # the links are gone, so is their note
    assert key == "tiny-report-comparison" and "Report" in description and "recipe tiny" in description
    # the same text a user reads, figures embedded
    assert embedded_markdown((report.path / "files" / "report.md").read_text(),
                             report.path / "files").split("\n", 1)[0] == md.split("\n", 1)[0]


def test_stage_artifacts_are_named_for_recipe_method_and_model(comparison, monkeypatch):
    _, store, _ = comparison
    sent = []
    monkeypatch.setattr("prefect.artifacts.create_markdown_artifact",
                        lambda md, key=None, description=None: sent.append((md, key, description)))
    from tasks.publish import about, publish_summary

    train = next(r for r in store.iter_refs("train")
                 if store.get("build", r.manifest["inputs"]["samples"]).manifest["config"]["method"] == "pose")
    publish_summary(train, about("demo", "models/passkey-llama-256", "pose"))
    publish_summary(train, about("demo", "models/passkey-llama-256", "pose"), reused=True)
    (md, key, description), (md2, key2, description2) = sent
    assert key == key2 == "demo-train-pose"
    assert md.startswith("# Stage 0 (extension) training, PoSE: recipe demo, model passkey-llama-256")
    assert "passkey-llama-256" in description and "PoSE" in description and train.key in description
    assert "Reused" in md2 and description2.startswith("Reused (Cached): ") and "Reused" not in md


@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")
def test_run_log_has_no_hook_lines_per_stage_but_keeps_its_errors():
    """Prefect logs 'Running hook ...' and '... finished running successfully' at INFO for
    every stage task (each has the when_cached hook): seen in the UI's log, two lines of
    noise per stage. They are filtered on Prefect's task-run logger, also after Prefect
    sets its logging up again; the hook's errors and other lines pass."""
    import logging

    from prefect.logging.configuration import setup_logging

    import tasks.publish  # noqa: F401  installs the filter, as the stage tasks do

    setup_logging()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        logger.info("Running hook 'when_cached' in response to entering state 'Completed'")
        logger.info("Hook 'when_cached' finished running successfully")
        logger.info("Finished in state Cached(type=COMPLETED)")
        logger.error("An error was encountered while running hook 'when_cached'")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Finished in state Cached(type=COMPLETED)",
                    "An error was encountered while running hook 'when_cached'"]
