"""Annealing (the paper's stage 1): the training loop again, on general replay data,
with a learning rate that decays to zero.

The input model is the `train` artifact: its RoPE and window are kept as they are
(nothing is re-applied). The replay samples are `full` samples built at a short
length from a general corpus, so their positions are contiguous. The public code
says it decays the rate but holds it constant; AnnealConfig refuses `constant`.
"""

from __future__ import annotations

import pyarrow.compute as pc

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.batches import TrainError
from longrecipe.config import (
    AnnealConfig,
    BuildConfig,
    PipelineConfig,
    RuntimeConfig,
    config_digest,
)
from longrecipe.launch import Job, produce
from longrecipe.loop import launch_training, needs_launch, train_model
from longrecipe.model_io import check_weights
from longrecipe.models import resolve

STAGE = "anneal"
# v2: the global batch is batch_size x grad_accum whatever the number of processes
STAGE_VERSION = "anneal_v2"


def anneal_spec(cfg: AnnealConfig, model: ArtifactRef, replay_samples: ArtifactRef) -> StageSpec:
    return StageSpec(STAGE, STAGE_VERSION, config_digest(cfg),
                     {"model": model.key, "replay": replay_samples.key})


def run_anneal(
    cfg: AnnealConfig,
    model: ArtifactRef,
    replay_samples: ArtifactRef,
    store: ArtifactStore,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> ArtifactRef:
    """Continue training the trained model on replay samples, learning rate to zero."""
    return _run_anneal(cfg, model, replay_samples, store, runtime, job=None)


def run_launched(job: Job) -> ArtifactRef:
    """One process of a launched anneal run (longrecipe.launched's entry)."""
    cfg = AnnealConfig.model_validate(job.config)
    return _run_anneal(cfg, job.inputs["model"], job.inputs["replay_samples"], job.store,
                       job.runtime, job=job)


def _run_anneal(cfg, model, replay_samples, store, runtime, *, job: Job | None) -> ArtifactRef:
    src = resolve(model)
    check_weights(src)
    check_replay(replay_samples)
    spec = anneal_spec(cfg, model, replay_samples)
    if job is None and needs_launch(cfg.optim, runtime):
        inputs = {"model": model, "replay_samples": replay_samples}
        return launch_training(spec, cfg, inputs, store, runtime)

    def body(w: StageWriter) -> None:
        train_model(
            src, replay_samples, cfg.optim, w, runtime,
            rope=None, target=None, save_dtype=cfg.save_dtype, label=STAGE,
            launched=job is not None,
        )

    return produce(store, spec, body, job)


def check_replay(samples: ArtifactRef) -> None:
    """Replay samples must be `full` samples (contiguous positions)."""
    if "samples" not in samples.tables():
        raise TrainError(f"{samples.stage}/{samples.key} has no `samples` table to replay")
    methods = pc.unique(samples.read_table("samples", columns=["method"]).column("method"))
    other = [m for m in methods.to_pylist() if m != "full"]
    if other:
        raise TrainError(
            f"{samples.stage}/{samples.key}: anneal replays `full` samples (contiguous "
            f"positions from a general corpus), got method {other[0]!r}; build the replay "
            "samples with build.method=full at the annealing length"
        )


def replay_build_config(cfg: PipelineConfig) -> BuildConfig:
    """Replay samples: contiguous `full` windows at the annealing length."""
    a = cfg.anneal
    n = a.num_samples or a.optim.max_steps * a.optim.global_batch
    return BuildConfig(
        method="full", train_len=a.train_len, target_len=a.train_len, seed=cfg.build.seed,
        num_samples=n, split="train",
    )
