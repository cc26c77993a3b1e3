"""Analysis and evaluation on several processes (`analyze.num_processes`,
`evaluate.num_processes`, through longrecipe.launch): each process computes its share of
the parts, process 0 commits one artifact, the same (key and tables) as a one-process
run's, and a run that died half-way resumes with another number of processes.

The launched tests are `integration`: each starts two gloo processes under `accelerate
launch` (10-20 s on 2 cores). The others check the pieces in process.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import longrecipe.launch as launch_mod
import longrecipe.launched as launched_mod
import longrecipe.scoring as scoring_mod
from longrecipe import ArtifactStore, EvaluateConfig, ModelSpec, StageSpec, load_config, run_ingest
from longrecipe.analyze import analyze_spec, run_analyze
from longrecipe.evaluate import run_evaluate
from longrecipe.evaluate import suites as suites_mod
from longrecipe.launch import (
    LaunchedInputError,
    _decode_input,
    _encode_input,
    assign_shares,
    launch,
)
from longrecipe.models import ModelSource, resolve
from tests.conftest import QUIET, ROOT

TWO = {"num_processes": 2}


def files(ref) -> dict[str, str]:
    """Every file of an artifact and its sha256 (the Parquet parts: byte for byte)."""
    return {f["path"]: f["sha256"] for f in ref.manifest["files"]}


def crash_on_call(n: int, real):
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    return flaky


# --------------------------------------------------------------------------- pieces


def test_shares_are_balanced_by_cost_and_the_same_in_every_process():
    # equal parts alternate; a long part counts for its cost
    assert assign_shares([1.0] * 6, 2) == [0, 1, 0, 1, 0, 1]
    owner = assign_shares([4.0, 1.0, 1.0, 1.0, 1.0], 2)
    assert owner[0] != owner[1] == owner[2] == owner[3] == owner[4]
    assert assign_shares([3.0, 2.0, 2.0], 1) == [0, 0, 0]
    assert assign_shares([1.0], 3) == [0]


def test_a_model_source_crosses_to_a_launched_process_with_its_identity(tmp_path, store, tiny_spec):
    """A trained model passed as a resolved source keeps its artifact identity (its key),
    not the content hash its folder would resolve to, so the process computes the same key."""
    src = resolve(tiny_spec)
    back = _decode_input(store, json.loads(json.dumps(_encode_input(src))))
    assert back == src
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    trained = ModelSource("folder", folder, "0123456789abcdef", ModelSpec(source=str(folder)))
    back = _decode_input(store, json.loads(json.dumps(_encode_input(trained))))
    assert back.identity == "0123456789abcdef" and back.path == folder
    assert _decode_input(store, _encode_input(tmp_path)) == tmp_path


def test_bad_input_in_a_launched_process_is_bad_input_in_the_parent(tmp_path, store, monkeypatch):
    """A launched process that stops on an InputError leaves its message; the parent
    raises it as bad input (exit 2 from the CLI), not as a crash."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"format": launch_mod.JOB_FORMAT, "id": "x", "stage": "nope-stage",
                               "store": store.root, "processes": 1, "config": {},
                               "runtime": {}, "inputs": {}}))
    monkeypatch.setitem(launched_mod.ENTRIES, "nope-stage", "tests.test_processes:_raise_input_error")
    with pytest.raises(ValueError, match="row 7 is bad"):
        launched_mod.main(["--job", str(job)])
    assert (tmp_path / "input-error-0.txt").read_text() == "documents.jsonl: row 7 is bad"

    def fake_run(cmd, env):  # the launched process, as accelerate would run it
        job_file = cmd[cmd.index("--job") + 1]
        try:
            launched_mod.main(["--job", job_file])
        except ValueError:
            return subprocess.CompletedProcess(cmd, 2)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(launch_mod.subprocess, "run", fake_run)
    monkeypatch.setattr(launch_mod, "_encode_input", lambda v: {})
    spec = StageSpec("nope-stage", "v1", {}, {})
    with pytest.raises(LaunchedInputError, match="row 7 is bad"):
        launch(spec, EvaluateConfig(), {}, store, QUIET, processes=1, accelerate_config=None,
               mixed_precision="no")


def _raise_input_error(job):
    from longrecipe.errors import InputError

    raise InputError("documents.jsonl: row 7 is bad")


# --------------------------------------------------------------------------- launched


@pytest.mark.integration
def test_analysis_on_two_processes_resumes_a_one_process_run_and_equals_it(tmp_path, monkeypatch):
    """The tiny recipe's analysis, one shard per document: a one-process run dies at its
    third shard; two processes finish it (each its share of the rest, process 0 the
    corpus-wide steps). Key and every table file equal an uninterrupted one-process run's."""
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs/tiny.yaml", ["analyze.shard_docs=1"])
    one, two = ArtifactStore(tmp_path / "one"), ArtifactStore(tmp_path / "two")
    clean = run_analyze(cfg.analyze, run_ingest(cfg.ingest, cfg.model, one, QUIET), cfg.model, one, QUIET)

    documents = run_ingest(cfg.ingest, cfg.model, two, QUIET)
    monkeypatch.setattr(scoring_mod.Scorer, "score", crash_on_call(3, scoring_mod.Scorer.score))
    with pytest.raises(RuntimeError, match="killed"):
        run_analyze(cfg.analyze, documents, cfg.model, two, QUIET)
    monkeypatch.undo()
    monkeypatch.chdir(ROOT)
    key = analyze_spec(cfg.analyze, documents, resolve(cfg.model)).key
    assert two.get("analyze", key) is None and key == clean.key

    resumed = run_analyze(cfg.analyze.model_copy(update=TWO), documents, cfg.model, two, QUIET)
    assert resumed.key == clean.key
    assert files(resumed) == files(clean)  # token_scores, sentences, token_stats: same bytes
    shards = clean.info["shards"]
    assert resumed.info["processes"] == 2 and resumed.info["devices"] == ["cpu", "cpu"]
    assert resumed.info["shards_computed"] == shards - 2  # the two finished parts were reused
    assert resumed.manifest["timings"]["resumed_parts"] >= 2
    for fact in ("sentences_flagged", "impactful_tokens", "tokens", "context_mean"):
        assert resumed.info[fact] == clean.info[fact], fact


@pytest.mark.integration
def test_evaluation_on_two_processes_resumes_and_equals_one_process(
    tmp_path, monkeypatch, store, documents, tiny_spec
):
    """Two models x (NIAH at two lengths, perplexity at two lengths, retention): 10 parts.
    A one-process run dies at its fourth part; two processes finish it; eval_results,
    eval_summary and heatmaps equal a one-process run's (timing columns aside)."""
    cfg = EvaluateConfig(suites=["niah", "perplexity", "retention"], lengths=[512, 768], depths=3,
                         niah_max_new_tokens=8, retention_length=64, max_documents=2)
    models = {"base": tiny_spec, "other": ModelSpec(tiny=tiny_spec.tiny.model_copy(update={"seed": 1}))}
    one = ArtifactStore(tmp_path / "one")
    shutil.copytree(documents.path, tmp_path / "one" / "ingest" / documents.key)
    clean = run_evaluate(cfg, models, one, QUIET, documents=one.require("ingest", documents.key))

    monkeypatch.setattr(suites_mod.SuiteRunner, "run", crash_on_call(4, suites_mod.SuiteRunner.run))
    with pytest.raises(RuntimeError, match="killed"):
        run_evaluate(cfg, models, store, QUIET, documents=documents)
    monkeypatch.undo()
    resumed = run_evaluate(cfg.model_copy(update=TWO), models, store, QUIET, documents=documents)

    assert resumed.key == clean.key
    assert resumed.info["processes"] == 2 and resumed.info["parts"] == 10
    assert resumed.info["parts_computed"] == 10 - 3 and resumed.manifest["timings"]["resumed_parts"] >= 3
    for table, volatile in (("eval_results", ["seconds"]), ("eval_summary", ["seconds_per_sample"])):
        a = clean.read_table(table).drop_columns(volatile).to_pylist()
        b = resumed.read_table(table).drop_columns(volatile).to_pylist()
        assert a == b, table
    heatmaps = {k: v for k, v in files(clean).items() if k.endswith(".png")}
    assert heatmaps and heatmaps == {k: v for k, v in files(resumed).items() if k.endswith(".png")}
