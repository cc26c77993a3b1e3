"""Context-extension training: the paper's stage 0.

`run_train` loads the base model, applies the RoPE change and the target window
(longrecipe.rope), trains on the `samples` table with each sample's own position
ids, and saves a complete Hugging Face folder (config with the new RoPE and
max_position_embeddings, safetensors, tokenizer, generation config) under
`files/model`, plus one `train_metrics` row per optimizer step.

Every forward call passes the position ids AND an explicit attention mask: without
the mask, transformers reads gapped position ids as packed sequences and silently
makes attention block-diagonal (see `causal_lm_forward`).

Checkpoints (longrecipe.checkpoints) go to the artifact's scratch folder every
`optim.checkpoint_every` steps; a rerun after a kill resumes from the last one and,
on a CPU, reproduces the loss trajectory of an uninterrupted run exactly.

The loop itself is longrecipe.loop (with batches, loss, checkpoints, distributed);
more than one process (or an accelerate config file) runs the same stage under
`accelerate launch` (longrecipe.launch, entry `python -m longrecipe.launched`).
"""

from __future__ import annotations

import json

import pyarrow.compute as pc

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.batches import TrainError
from longrecipe.config import ModelSpec, RuntimeConfig, TrainConfig, config_digest
from longrecipe.launch import Job, produce
from longrecipe.loop import check_target, launch_training, needs_launch, train_model
from longrecipe.model_io import as_source, check_weights
from longrecipe.models import ModelSource

__all__ = ["TrainError", "run_train", "train_spec"]

STAGE = "train"
# v2: the global batch is batch_size x grad_accum whatever the number of processes
STAGE_VERSION = "train_v2"


def train_spec(cfg: TrainConfig, samples: ArtifactRef, model: ModelSource,
               analysis: ArtifactRef | None = None) -> StageSpec:
    """The stage's identity: its config without the fields that only say how it is run
    (processes, accelerate file, loss chunks), its version and its inputs; with LongCE
    loss weights (train.loss_weights) the analysis they come from is an input too."""
    config = config_digest(cfg)
    inputs = {"samples": samples.key, "model": model.key}
    if cfg.loss_weights is None:
        config.pop("loss_weights")  # plain training keeps the keys it had before the field
    else:
        if analysis is None:
            raise TrainError(
                "train.loss_weights (LongCE) needs the analysis artifact whose scores weight the "
                "loss: run the analyze stage (analyze.method=lsd) and pass it to train"
            )
        inputs["analysis"] = analysis.key
    return StageSpec(STAGE, STAGE_VERSION, config, inputs)


def run_train(
    cfg: TrainConfig,
    samples: ArtifactRef,
    model: ModelSpec | ModelSource | ArtifactRef,
    store: ArtifactStore,
    runtime: RuntimeConfig = RuntimeConfig(),
    analysis: ArtifactRef | None = None,
) -> ArtifactRef:
    """Train `model` on `samples` with the RoPE change and target window of `cfg`;
    `analysis` (an lsd analysis of the samples' documents) when cfg.loss_weights is set."""
    return _run_train(cfg, samples, model, store, runtime, analysis, job=None)


def run_launched(job: Job) -> ArtifactRef:
    """One process of a launched train run (longrecipe.launched's entry)."""
    cfg = TrainConfig.model_validate(job.config)
    return _run_train(cfg, job.inputs["samples"], job.inputs["model"], job.store, job.runtime,
                      job.inputs.get("analysis"), job=job)


def _run_train(cfg, samples, model, store, runtime, analysis=None, *, job: Job | None) -> ArtifactRef:
    src = as_source(model)
    check_weights(src)
    spec = train_spec(cfg, samples, src, analysis)
    target = target_window(cfg, samples)
    check_target(target, base_window(src))
    weights = None
    if cfg.loss_weights is not None:  # checked before any process starts
        from longrecipe.token_weights import TokenWeights

        weights = TokenWeights(analysis, cfg.loss_weights, samples)
    if job is None and needs_launch(cfg.optim, runtime):
        inputs = {"samples": samples, "model": model} | ({"analysis": analysis} if weights else {})
        return launch_training(spec, cfg, inputs, store, runtime)

    def body(w: StageWriter) -> None:
        train_model(
            src, samples, cfg.optim, w, runtime,
            rope=cfg.rope, target=target, save_dtype=cfg.save_dtype, label=STAGE,
            launched=job is not None, weights=weights,
        )

    return produce(store, spec, body, job)


def target_window(cfg: TrainConfig, samples: ArtifactRef) -> int:
    """max_position_embeddings of the trained model: the config's, else build.target_len,
    else one past the largest position id in the samples."""
    if cfg.max_position_embeddings:
        return cfg.max_position_embeddings
    target = samples.manifest.get("config", {}).get("target_len")
    if target:
        return int(target)
    if "samples" not in samples.tables():
        raise TrainError(f"{samples.stage}/{samples.key} has no `samples` table to train on")
    col = samples.read_table("samples", columns=["max_position"]).column("max_position")
    return int(pc.max(col).as_py()) + 1


def base_window(src: ModelSource) -> int | None:
    """The model's max_position_embeddings when it is cheap to know before loading
    (tiny preset, local folder); None for a GGUF file (checked after loading)."""
    if src.kind == "tiny":
        return src.spec.tiny.max_position_embeddings
    if src.kind == "folder" and src.path is not None:
        config = json.loads((src.path / "config.json").read_text())
        config = config.get("text_config", config)
        return config.get("max_position_embeddings")
    return None
