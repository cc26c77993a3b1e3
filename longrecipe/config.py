"""Typed, frozen configs: one model per stage, a PipelineConfig made of them,
and a RuntimeConfig that never enters a key.

Every field carries a docstring (pydantic reads them with
``use_attribute_docstrings``), unknown keys are rejected, and a bad value
fails at load with the field path, the file and the line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from longrecipe.errors import InputError

NOT_IN_KEY = {"in_key": False}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
"""A device as a run names it: auto, cpu, cuda, or cuda:N (one GPU of several)."""


def unkeyed(default: Any, **kwargs: Any) -> Any:
    """A field that never enters a stage key: how a result is computed, not what (process
    counts, launcher files, chunk sizes). `config_digest` leaves it out."""
    return Field(default, json_schema_extra=NOT_IN_KEY, **kwargs)


class Frozen(BaseModel):
    """Base of every config: immutable, strict about unknown keys, documented fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ConfigError(InputError):
    """A config file or override that does not validate; the message names file, field and line."""


# --------------------------------------------------------------------------- models


class TinyModelConfig(Frozen):
    """A randomly initialised model built in-process from a transformers config (unit tests,
    seconds)."""

    family: Literal["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"] = "llama"
    """Architecture of the model, built from that family's transformers config with its
    own traits: llama (tied head), mistral (untied head), qwen2 (q/k/v biases, tied),
    qwen3 (q/k norms, tied), phi3 (partial rotary: half of each head rotates, fused
    q/k/v, untied), gemma2 (attention and final-logit soft-capping, eager attention,
    tied)."""
    hidden_size: int = Field(64, ge=8)
    """Width of the residual stream."""
    intermediate_size: int = Field(128, ge=8)
    """Width of the MLP."""
    num_hidden_layers: int = Field(2, ge=1)
    """Number of decoder layers."""
    num_attention_heads: int = Field(4, ge=1)
    """Query heads."""
    num_key_value_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention when fewer than the query heads)."""
    max_position_embeddings: int = Field(256, ge=8)
    """The model's native window."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base."""
    seed: int = 0
    """Seed of the random initialisation."""
    add_bos: bool = False
    """The byte tokenizer prepends its BOS token (id 256) to every text it encodes, as the
    Llama, Mistral and Gemma tokenizers do; off, it adds nothing (as Qwen's and SmolLM2's)."""


class ModelSpec(Frozen):
    """Where a model comes from. Nothing is ever loaded from a hub."""

    source: str = "tiny"
    """`tiny` (the in-process preset), a local Hugging Face folder, or a `.gguf` file."""
    tiny: TinyModelConfig = TinyModelConfig()
    """Shape of the `tiny` preset (ignored for other sources)."""
    trust_remote_code: bool = False
    """Allow a local folder's own modelling code to run. Off unless you turn it on."""


class RopeConfig(Frozen):
    """A RoPE change applied before training and saved with the model (transformers'
    `rope_parameters`)."""

    type: Literal["default", "linear", "yarn", "llama3", "dynamic"] = "default"
    """RoPE variant. `default` with a new `theta` is the paper's recipe (raise the base).
    `dynamic` is refused for training (it rescales per batch, so gapped position ids make
    results depend on batch order); the analysis may use it for a reference model."""
    theta: float | None = Field(None, gt=0)
    """New RoPE base (rope_theta); None keeps the model's."""
    factor: float | None = Field(None, ge=1)
    """Scaling factor for linear / yarn / llama3 / dynamic; None derives it as the target
    window divided by the original window."""
    original_max_position_embeddings: int | None = Field(None, ge=1)
    """The window the model was pre-trained at (yarn, llama3, and the derived factor); None
    takes the model's own (its rope_parameters' original window, else its
    max_position_embeddings)."""
    low_freq_factor: float | None = Field(None, gt=0)
    """llama3 only: wavelengths above original window / low_freq_factor are divided by factor.
    None keeps the model's own (a model already on llama3 RoPE), else 1.0 (Llama 3.1)."""
    high_freq_factor: float | None = Field(None, gt=0)
    """llama3 only: wavelengths below original window / high_freq_factor are kept. None keeps
    the model's own, else 4.0 (Llama 3.1)."""
    replace_scaling: bool = False
    """Allow `type` to replace a scaling the model already has (Llama-3.1's llama3, a yarn
    model, ...). Off: such a change is refused, so a scaled model is never silently turned
    back into plain RoPE. Every rope_parameters key this config does not set is kept either
    way (partial_rotary_factor, mrope sections, ...)."""

    @model_validator(mode="after")
    def _consistent(self) -> RopeConfig:
        if self.type == "default" and self.factor is not None:
            raise ValueError(
                "rope.factor is only used by rope.type linear, yarn, llama3 or dynamic; "
                "with type 'default' change rope.theta instead"
            )
        low, high = self.low_freq_factor, self.high_freq_factor
        if self.type == "llama3" and low is not None and high is not None and high <= low:
            raise ValueError("rope.high_freq_factor must be above rope.low_freq_factor")
        return self


# --------------------------------------------------------------------------- stages


class SourceSpec(Frozen):
    """One corpus source."""

    path: str
    """A JSONL file, a Parquet file, a text file, a folder of text files, or a folder written
    by `datasets.Dataset.save_to_disk`. Relative paths are taken from the working directory."""
    format: Literal["auto", "jsonl", "parquet", "text", "datasets"] = "auto"
    """How to read it; `auto` decides from the suffix or folder content."""
    text_field: str = "text"
    """Column or JSON key holding the text (JSONL, Parquet, datasets)."""
    glob: str = "**/*.txt"
    """Files taken from a folder of text files."""


class IngestConfig(Frozen):
    """Corpus ingest: read sources, tokenize, split into sentences, write `documents`."""

    sources: list[SourceSpec] = []
    """Where the text comes from."""
    min_tokens: int = Field(1, ge=1)
    """Documents with fewer tokens are dropped."""
    max_tokens: int | None = Field(None, ge=1)
    """Longer documents are truncated to this many tokens (at a sentence end when one exists)."""
    dedup: bool = True
    """Drop exact duplicate texts (same sha256)."""
    heldout_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of documents (chosen by text hash, so stable) put in split `heldout`: never
    trained on, used by the perplexity evaluation."""
    max_documents: int | None = Field(None, ge=1)
    """Stop after this many documents (after dedup)."""
    shard_size: int = Field(256, ge=1)
    """Documents per Parquet part."""


class ReferenceTrainingConfig(Frozen):
    """The paper's H': the base model after a short long-context training on the ingested
    documents, made inside the DAG as its own cached build and train stages, then used as
    the logit_delta reference."""

    build: BuildConfig = Field(default_factory=lambda: BuildConfig(method="pose"))
    """Its samples: `pose`, `full` or `randomized` at the target window (`longrecipe` would
    need this very analysis). Keep them few: a few hundred steps' worth, as the paper."""
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    """Its training: steps, learning rate and the RoPE change (e.g. a larger theta)."""

    @model_validator(mode="after")
    def _no_cycle(self) -> ReferenceTrainingConfig:
        if self.build.method == "longrecipe":
            raise ValueError(
                "analyze.reference_training.build.method cannot be 'longrecipe': its samples "
                "need the analysis that this reference is for; use pose, full or randomized"
            )
        return self


class AnalyzeConfig(Frozen):
    """Impactful-token analysis (token-level log-probabilities)."""

    method: Literal["logit_delta", "lsd", "digits"] = "lsd"
    """`logit_delta` (the paper: reference minus base log-prob), `lsd` (one model, LongPPL:
    long minus short context), `digits` (the public code's heuristic)."""
    reference: ModelSpec | None = None
    """Reference long-context model for `logit_delta` (same tokenizer as the base model).
    Leave it unset and set `reference_rope` to use the base model with a RoPE change."""
    reference_rope: RopeConfig | None = None
    """RoPE change that turns the base model into the reference (logit_delta without a
    reference model)."""
    reference_training: ReferenceTrainingConfig | None = None
    """Make the reference as the paper did: the base model trained briefly at long context
    (its own build and train stages, cached). The pipeline flow runs them before the
    analysis; from the library, call `run_reference_training` and pass its model."""
    max_context: int = Field(4096, ge=8)
    """Longest context of one long pass; longer documents are chunked into overlapping
    windows (the `context` column records the context each token really had)."""
    min_context: int | None = Field(None, ge=1)
    """Least context of a token scored by a chunk after the first (None: max_context // 2).
    Chunks overlap by this much, so the long pass costs max_context / (max_context -
    min_context) times a single pass."""
    short_window: int = Field(256, ge=1)
    """W: the most tokens of context in the short pass (lsd)."""
    short_stride: int = Field(64, ge=1)
    """S: targets scored per short window; a target sees W - S + 1 to W tokens. Smaller is
    closer to exact and slower (the short pass forwards about (W + 1) / S tokens per token)."""
    unit: Literal["auto", "type", "occurrence"] = "auto"
    """What the selection ranks. `type` (the paper): token ids, by their mean score over
    the whole corpus (types seen fewer than min_type_count times are never impactful);
    every occurrence of an impactful type is impactful. `occurrence`: single tokens, by
    their own score, within each document. `auto`: type for logit_delta, occurrence for
    lsd (LongPPL's key tokens); digits ignores it."""
    selection: Literal["auto", "top_fraction", "threshold"] = "auto"
    """How impactful types or tokens are picked from the scores. `auto`: top_fraction for
    logit_delta (the paper), threshold for lsd (LongPPL); digits ignores it."""
    top_fraction: float = Field(0.2, gt=0, le=1)
    """selection=top_fraction: the share flagged, rounded up: of the eligible token types
    (unit=type; the paper keeps the top 20%), or of each document's scored tokens
    (unit=occurrence)."""
    min_type_count: int = Field(5, ge=1)
    """unit=type: a token type needs this many scored occurrences in the corpus to be
    ranked (a mean over fewer is noise)."""
    threshold: float = 2.0
    """logit_delta threshold: the score (nats; a type's mean score for unit=type) must
    exceed it (selection=threshold)."""
    lsd_alpha: float = 2.0
    """lsd threshold: LSD (nats; a type's mean for unit=type) must exceed it
    (selection=threshold)."""
    lsd_beta: float = -2.0
    """lsd threshold: the long log-probability (a type's mean for unit=type) must exceed it
    (selection=threshold)."""
    sentence_fraction: float = Field(0.3, gt=0, le=1)
    """Share of the analysed sentences flagged impactful (what build always keeps): the
    ones with the largest share of impactful tokens (ties: more impactful tokens, then
    corpus order), rounded up; a sentence without any impactful token is never flagged.
    1.0 flags every sentence that holds one. digits keeps its own rule (a digit in the
    sentence's text)."""
    batch_tokens: int = Field(8192, ge=8)
    """Padded tokens per forward pass (windows are packed up to it; a longer one runs alone)."""
    shard_docs: int = Field(16, ge=1)
    """Documents per resumable part (also the unit processes share)."""
    max_documents: int | None = Field(None, ge=1)
    """Analyse only the first N training documents."""
    num_processes: int | None = unkeyed(None, ge=1)
    """Processes that score the shards, each its share (on GPUs one GPU each); process 0
    then makes the corpus-wide statistic, the flags and the tables. None: the accelerate
    config file's num_processes, else 1. Above 1, or with an accelerate config, the
    stage runs itself under `accelerate launch`. Not in the key: the artifact is the same
    for any number of processes."""
    accelerate_config: str | None = unkeyed(None)
    """An accelerate config file (processes, machines, GPU ids: several nodes through
    accelerate's torchrun launcher); when set, the stage runs under `accelerate launch
    --config_file` even on one process. Not in the key."""

    @model_validator(mode="after")
    def _consistent(self) -> AnalyzeConfig:
        given = [name for name in ("reference", "reference_rope", "reference_training")
                 if getattr(self, name) is not None]
        if self.method == "logit_delta":
            if not given:
                raise ValueError(
                    "analyze.method=logit_delta needs a reference model: set analyze.reference "
                    "(a local model), analyze.reference_rope (a RoPE change of the base "
                    "model) or analyze.reference_training (the base after a short "
                    "long-context training)"
                )
            if len(given) > 1:
                raise ValueError(
                    f"analyze.{' and analyze.'.join(given)} are both set: use one"
                )
            rope = self.reference_rope
            if rope is not None and rope.type == "default" and rope.theta is None:
                raise ValueError(
                    "analyze.reference_rope changes nothing: set theta, or a type with a factor"
                )
            if rope is not None and rope.type != "default" and rope.factor is None:
                raise ValueError(
                    f"analyze.reference_rope.factor is needed for rope type {rope.type!r}"
                )
        elif self.reference_training is not None:
            raise ValueError(
                "analyze.reference_training is only used by method logit_delta (it trains the "
                f"reference model), not by {self.method!r}"
            )
        if self.min_context is not None and self.min_context >= self.max_context:
            raise ValueError(
                f"analyze.min_context ({self.min_context}) must be below analyze.max_context "
                f"({self.max_context})"
            )
        if self.method == "lsd":
            if self.short_stride > self.short_window:
                raise ValueError(
                    f"analyze.short_stride ({self.short_stride}) must not exceed "
                    f"analyze.short_window ({self.short_window})"
                )
            if self.short_window > self.long_min_context:
                raise ValueError(
                    f"analyze.short_window ({self.short_window}) must not exceed the least long "
                    f"context (analyze.min_context, default max_context // 2 = "
                    f"{self.long_min_context}): else the long pass can see less than the short"
                )
        return self

    @property
    def effective_unit(self) -> str:
        """`unit` with `auto` resolved for the method (`digits` for the digits method)."""
        if self.method == "digits":
            return "digits"
        if self.unit != "auto":
            return self.unit
        return "type" if self.method == "logit_delta" else "occurrence"

    @property
    def long_min_context(self) -> int:
        """The least context of a token scored after the first chunk of the long pass."""
        return self.min_context if self.min_context is not None else self.max_context // 2

    @property
    def effective_selection(self) -> str:
        """`selection` with `auto` resolved for the method."""
        if self.method == "digits":
            return "digits"
        if self.selection != "auto":
            return self.selection
        return "top_fraction" if self.method == "logit_delta" else "threshold"


class BuildConfig(Frozen):
    """Position-index sample building (docs/build.md)."""

    method: Literal["full", "randomized", "pose", "longrecipe"] = "longrecipe"
    """Sampling scheme: `full` (FLT: target_len contiguous tokens at positions
    0..target_len-1), `randomized` (RPES: train_len tokens at sorted random distinct
    positions), `pose` (train_len tokens in two chunks, the second shifted by a random
    skip), `longrecipe` (kept sentences, head of rt tokens, gaps between sentences)."""
    train_len: int = Field(300, ge=2)
    """Tokens per training sample; must be below target_len. Ignored by `full`."""
    target_len: int = Field(1024, ge=2)
    """The context window to extend to; every position id is below it. `full` samples
    are this long."""
    seed: int = 2027
    """Seed of every random choice of the stage (keep decisions, heads, gaps, skips)."""
    keep_ratio: float = Field(0.5, ge=0, le=1)
    """longrecipe: probability of keeping a sentence with no impactful token (the public
    code drops half); sentences with an impactful token are always kept."""
    head_rule: Literal["random", "fixed", "none"] = "random"
    """longrecipe: the first rt tokens keep positions 0..rt-1; `random` draws rt uniform in
    [1, (train_len+1)//2] (the public code), `fixed` uses head_len, `none` means rt = 1."""
    head_len: int = Field(1, ge=1)
    """rt for head_rule=fixed; at most train_len."""
    gap_rule: Literal["random", "source"] = "random"
    """longrecipe: `random` spreads all target_len - train_len spare positions as random
    gaps between kept sentences (the last position is target_len - 1); `source` makes each
    gap the number of tokens really skipped in the document, scaled down when they add up
    to more than target_len - train_len (0 where a sample crosses into the next document)."""
    num_samples: int | None = Field(None, ge=1)
    """Stop after this many samples (None: as many whole samples as the documents hold)."""
    num_tokens: int | None = Field(None, ge=1)
    """Stop once this many tokens are built, rounded up to whole samples (whichever of
    num_samples/num_tokens comes first)."""
    split: Literal["train", "heldout", "all"] = "train"
    """Which documents to draw from (documents.split)."""
    shard_samples: int = Field(256, ge=1)
    """Samples per resumable Parquet part."""

    @model_validator(mode="after")
    def _lengths(self) -> BuildConfig:
        if self.method != "full" and self.train_len >= self.target_len:
            raise ValueError(
                f"build.train_len ({self.train_len}) must be below build.target_len "
                f"({self.target_len}) for method {self.method!r}"
            )
        if self.method == "longrecipe" and self.head_rule == "fixed" and self.head_len > self.train_len:
            raise ValueError(
                f"build.head_len ({self.head_len}) must not exceed build.train_len ({self.train_len})"
            )
        return self


class OptimConfig(Frozen):
    """The training loop's optimisation settings (train and anneal).

    The global batch (samples per optimizer step) is batch_size x grad_accum whatever
    the number of processes: processes share the step's micro-batches, they do not add
    to them. `num_processes`, `accelerate_config` and `loss_chunk_tokens` say how the
    step is computed, not what: they never enter the stage key.
    """

    lr: float = Field(5e-5, gt=0)
    """Peak learning rate (AdamW)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After warmup: constant, cosine to zero, or linear to zero (transformers' schedules:
    step k runs at the schedule's value after k - 1 steps, so it is exactly zero after the
    last step)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from zero, in optimizer steps."""
    max_steps: int = Field(10, ge=1)
    """Optimizer steps. The samples are cycled (reshuffled each epoch) when they run out."""
    batch_size: int = Field(1, ge=1)
    """Samples per micro-batch: one forward pass of one process (shorter samples are
    right-padded, or packed into one row under flash attention)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step, all processes together: the global batch is
    batch_size x grad_accum samples. With N processes each runs grad_accum / N of them
    (grad_accum must be a multiple of N). The loss is the mean over every label token of
    the global batch, so accumulation equals one big batch."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping (None: off; the norm is still recorded). Also DeepSpeed's
    `gradient_clipping` (0 when off)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    seed: int = 2027
    """Seed of the data order (and of dropout, where a model has any)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16: autocast to bfloat16 with fp32 master weights (CPU and GPU; under DeepSpeed or
    FSDP their own bf16 mixed precision); fp32: no autocast."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a resumable checkpoint every N optimizer steps (0: never). A rerun after a
    kill resumes from the last one."""
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    """auto: flash_attention_2 on CUDA with flash-attn installed, else sdpa. Resolved once
    for the device the model trains on. flex_attention trains on CUDA only (torch has no
    flex_attention backward on CPU)."""
    loss_chunk_tokens: int = unkeyed(1024, ge=1)
    """Tokens per chunk of the output head and cross-entropy: logits exist for one chunk
    at a time and are recomputed in backward. Changes memory, not the loss (not in the key)."""
    num_processes: int | None = unkeyed(None, ge=1)
    """Processes (GPUs) that compute each step; None: the accelerate config file's
    num_processes, else 1. Above 1, or with an accelerate config, the stage runs itself
    under `accelerate launch`. Not in the key: it changes who computes the global batch,
    not the result."""
    accelerate_config: str | None = unkeyed(None)
    """An accelerate config file (e.g. configs/accelerate/deepspeed-zero3-offload.yaml);
    when set, the stage runs under `accelerate launch --config_file` even on one process.
    Not in the key."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimConfig:
        if self.schedule != "constant" and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"optim.warmup_steps ({self.warmup_steps}) must be below optim.max_steps "
                f"({self.max_steps}) for a schedule that decays"
            )
        if self.num_processes is not None:
            self.per_process_accum(self.num_processes)
        return self

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all processes together."""
        return self.batch_size * self.grad_accum

    def per_process_accum(self, processes: int) -> int:
        """Micro-batches each of `processes` processes runs per optimizer step."""
        if self.grad_accum % processes:
            raise ValueError(
                f"optim.grad_accum ({self.grad_accum}) must be a multiple of the number of "
                f"processes ({processes}): processes share the step's micro-batches, so the "
                "global batch (batch_size x grad_accum) stays what the config says"
            )
        return self.grad_accum // processes


class TrainConfig(Frozen):
    """Context-extension training (the paper's stage 0)."""

    optim: OptimConfig = OptimConfig()
    """Optimisation settings."""
    rope: RopeConfig | None = None
    """RoPE change applied before training and saved with the model (None: keep the
    model's RoPE; the window still becomes max_position_embeddings)."""
    max_position_embeddings: int | None = Field(None, ge=1)
    """The trained model's window, saved in its config; None takes the samples' target
    (build.target_len). Must not be below the base model's window."""
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the saved weights (training itself keeps fp32 master weights)."""
    loss_weights: LossWeightsConfig | None = None
    """Weight each label token's loss (LongCE); None: plain cross-entropy. Needs the
    analysis artifact (lsd) as an input of the stage. Left out of the key when None, so
    plain training keeps its keys."""


class LossWeightsConfig(Frozen):
    """LongCE-style token weights from the analysis the pipeline already stored: each label
    token's cross-entropy times min(exp(LSD), cap), LSD being the lsd analysis's score of
    that token (log-prob with long context minus with short context; LongCE computes it
    online with the model being trained, we read the base model's). A token the analysis
    did not score (a document beyond analyze.max_documents, the EOS between documents,
    the first token of a document) gets weight 1, as a token whose LSD is 0. The loss is
    the weighted sum over label tokens divided by their number, as LongCE's."""

    kind: Literal["longce"] = "longce"
    """The weighting rule (LongCE's is the one there is)."""
    cap: float = Field(5.0, ge=1.0)
    """Largest weight: min(exp(LSD), cap); LongCE's is 5."""


class AnnealConfig(Frozen):
    """Annealing on replay data with a learning rate that decays to zero (stage 1)."""

    optim: OptimConfig = OptimConfig(lr=5e-6, schedule="linear")
    """Optimisation settings; the schedule must end at zero (linear or cosine)."""
    replay: IngestConfig = IngestConfig()
    """The general replay corpus (no sources: the main corpus is replayed)."""
    train_len: int = Field(256, ge=2)
    """Length of replay samples (method `full`: contiguous positions)."""
    num_samples: int | None = Field(None, ge=1)
    """Replay samples to build (None: as many as max_steps needs)."""
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the saved weights."""

    @model_validator(mode="after")
    def _decays_to_zero(self) -> AnnealConfig:
        if self.optim.schedule == "constant":
            raise ValueError("anneal.optim.schedule must decay to zero: use 'linear' or 'cosine'")
        return self


class MergeConfig(Frozen):
    """Weighted average of the original and the annealed weights (stage 2)."""

    weight: float = Field(0.5, ge=0, le=1)
    """Weight of the annealed model; the original gets 1 - weight (paper code: 0.5).
    The merged folder keeps the annealed model's config (its RoPE and window)."""


class EvaluateConfig(Frozen):
    """Long-context evaluation: NIAH grid, RULER tasks, perplexity by length, retention."""

    suites: list[Literal["niah", "ruler", "perplexity", "retention"]] = ["niah", "perplexity"]
    """Which suites to run, in this order."""
    lengths: list[int] = [512, 1024, 2048]
    """Context lengths in tokens of the evaluated model's tokenizer (input plus tokens to
    generate) for niah, ruler and perplexity; the NIAH heatmap's columns."""
    depths: int = Field(10, ge=1)
    """NIAH: this many evenly spaced needle depths from 0 to 100% (the heatmap's rows)."""
    haystack: Literal["essay", "corpus", "noise"] = "noise"
    """NIAH haystack: RULER's Paul Graham essays (`longrecipe data fetch ruler`), the held-out
    documents of the ingested corpus, or RULER's noise line repeated."""
    niah_samples: int = Field(1, ge=1)
    """NIAH: needles per (length, depth) cell, each with its own key and number."""
    niah_max_new_tokens: int = Field(32, ge=1)
    """NIAH: tokens to generate (counted in the length budget)."""
    ruler_tasks: list[
        Literal[
            "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
            "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
            "vt", "cwe", "fwe", "qa_1", "qa_2",
        ]
    ] = []
    """RULER tasks to run (empty: all 13)."""
    samples: int = Field(4, ge=1)
    """Samples per RULER task and length (RULER uses 500)."""
    seed: int = 42
    """Seed of every generated input (RULER's default: 42)."""
    prompt_format: Literal["base", "chat"] = "base"
    """How NIAH and RULER prompts are given to the model: `base` (the task text followed by
    the answer prefix, RULER's form for base models) or `chat` (the task text as the user
    turn of the tokenizer's chat template, then the answer prefix, RULER's form for chat
    models such as the paper's Llama-3-8B-Instruct). chat needs a tokenizer with a chat
    template."""
    stop_at_newline: bool = False
    """End an answer at its first line break once it has some text (NIAH and RULER's
    single-answer tasks); EOS always ends it. Off (RULER: no stop words): generate until
    EOS or the task's limit."""
    batch_size: int = Field(1, ge=1)
    """Prompts per generation batch, and documents per perplexity forward pass."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights and activations; auto: bfloat16 on CUDA, float32 on CPU."""
    retention_length: int = Field(256, ge=8)
    """Context length of the retention (short-context perplexity) suite."""
    max_documents: int = Field(8, ge=1)
    """Held-out documents per perplexity length and for retention: the first N that have
    at least that many tokens."""
    num_processes: int | None = unkeyed(None, ge=1)
    """Processes that share the (model, suite, task, length) parts (on GPUs one GPU each);
    process 0 then writes the summary and heatmaps. None: the accelerate config file's
    num_processes, else 1. Above 1, or with an accelerate config, the stage runs itself
    under `accelerate launch`. Not in the key: the artifact is the same for any number
    of processes."""
    accelerate_config: str | None = unkeyed(None)
    """An accelerate config file (processes, machines, GPU ids: several nodes through
    accelerate's torchrun launcher); when set, the stage runs under `accelerate launch
    --config_file` even on one process. Not in the key."""

    @model_validator(mode="after")
    def _check_lengths(self) -> EvaluateConfig:
        if not self.lengths:
            raise ValueError("evaluate.lengths is empty: give at least one context length")
        if any(n < 8 for n in self.lengths) or len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"evaluate.lengths must be distinct and >= 8 (got {self.lengths})")
        if len(set(self.suites)) != len(self.suites):
            raise ValueError(f"evaluate.suites names a suite twice (got {self.suites})")
        return self


class ReportConfig(Frozen):
    """The final report."""

    format: Literal["markdown", "html"] = "markdown"
    """Which file the end of a run points to: `report.md` (its figures beside it) or
    `report.html` (one page, figures embedded); both are always written."""


class CompareConfig(Frozen):
    """The paper's comparison (flows/compare.py): one ingest and analysis, then each method's
    samples, training and evaluation, at the same number of samples, optimizer steps and so
    target windows covered."""

    methods: list[Literal["full", "randomized", "pose", "longrecipe"]] = [
        "full", "randomized", "pose", "longrecipe"]
    """Methods to compare; each uses the `build` section with its `method` replaced."""
    through: Literal["train", "merge"] = "train"
    """Evaluate each method's model after training only (stage 0), or after annealing and
    merging (stages 1 and 2)."""
    devices: list[str] | int | None = None
    """Devices the branches (the base model's evaluation, then each method's build, train,
    anneal, merge and evaluation) run on at the same time, one branch per device: a list
    (`[cuda:0, cuda:1]`; `[cpu, cpu]` gives two CPU slots), a count N (cuda:0..N-1 where
    the run uses CUDA, else N CPU slots), or None (one branch after another on the run's
    device). Where a branch runs never changes what it makes: the artifacts and their
    keys are those of the sequential run."""
    flops_of: Literal["full", "randomized", "pose", "longrecipe"] | None = None
    """Equal compute: every method gets the stage-0 training FLOPs of this method at
    train.optim.max_steps (its steps, and its samples with them, scaled by the ratio of
    FLOPs per step; longrecipe.budget). None: the same samples and steps for every method."""
    steps: dict[str, int] = {}
    """Optimizer steps of a method's stage 0 by hand (`{full: 40}`), over flops_of and
    max_steps; its samples scale with them."""

    @model_validator(mode="after")
    def _steps(self) -> CompareConfig:
        bad = [m for m in self.steps if m not in ("full", "randomized", "pose", "longrecipe")]
        if bad:
            raise ValueError(f"compare.steps: {bad[0]!r} is not a method "
                             "(full, randomized, pose, longrecipe)")
        if any(v < 1 for v in self.steps.values()):
            raise ValueError("compare.steps: steps must be at least 1")
        return self

    @model_validator(mode="after")
    def _devices(self) -> CompareConfig:
        d = self.devices
        if isinstance(d, int) and d < 1:
            raise ValueError(f"compare.devices: a count must be at least 1 (got {d})")
        if isinstance(d, list):
            if not d:
                raise ValueError("compare.devices is empty: name at least one device, or "
                                 "leave it unset to run the branches one after another")
            bad = [x for x in d if not DEVICE_PATTERN.match(x) or x == "auto"]
            if bad:
                raise ValueError(f"compare.devices: {bad[0]!r} is not cpu, cuda or cuda:N")
        return self


class PlanConfig(Frozen):
    """What `longrecipe plan` assumes about the machine; no stage reads it, so it is part
    of no key."""

    model_shape: str | None = None
    """A config.json with the base model's shape (hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size), used while
    model.source is not here (configs/models/ holds some); the model's own config.json
    or GGUF header wins once it is."""
    gpu_memory_gb: float = Field(80.0, gt=0)
    """Memory of one GPU in GB (1e9 bytes)."""
    gpus: int | None = Field(None, ge=1)
    """GPUs per stage; None: each stage's number of processes."""
    peak_tflops: float = Field(989.0, gt=0)
    """Dense bf16 peak of one GPU in TFLOP/s (H100/H200 SXM: 989)."""
    mfu: float = Field(0.4, gt=0, le=1)
    """Model FLOPs utilisation assumed for the hours."""


class PipelineConfig(Frozen):
    """A whole recipe: the base model and one section per stage."""

    name: str = "longrecipe"
    """Name of the run (used for the Prefect flow-run name)."""
    model: ModelSpec = ModelSpec()
    """The base model to extend (also the tokenizer used at ingest)."""
    ingest: IngestConfig = IngestConfig()
    """Corpus ingest."""
    analyze: AnalyzeConfig = AnalyzeConfig()
    """Impactful-token analysis."""
    build: BuildConfig = BuildConfig()
    """Sample building."""
    train: TrainConfig = TrainConfig()
    """Context-extension training."""
    anneal: AnnealConfig = AnnealConfig()
    """Annealing on replay data."""
    merge: MergeConfig = MergeConfig()
    """Weight merging."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Evaluation."""
    report: ReportConfig = ReportConfig()
    """Report."""
    compare: CompareConfig = CompareConfig()
    """The method comparison (flows/compare.py)."""
    plan: PlanConfig = PlanConfig()
    """Assumptions of `longrecipe plan` (GPU memory, MFU, the model's shape)."""


class RuntimeConfig(Frozen):
    """How to run, never what to compute: it never enters a key."""

    device: str = Field("auto", pattern=DEVICE_PATTERN.pattern)
    """Where models run: auto (CUDA when torch sees it, else the CPU), cpu, cuda, or one
    GPU of several as cuda:N (what a branch of the concurrent comparison gets)."""
    isolated: bool = False
    """Run each training stage (train, anneal) in a process of its own, under `accelerate
    launch` with one process, as with num_processes > 1. The concurrent comparison sets
    it: its branches are threads of one Python process, and accelerate keeps its device
    and gradient-accumulation state per process, not per thread."""
    workers: int = Field(1, ge=1)
    """Parallel workers where a stage can use them."""
    progress: bool = True
    """Show progress: rich bars on a terminal, a plain line per tenth of a stage in logs."""
    threads: int | None = Field(None, ge=1)
    """torch CPU threads (None: torch's default)."""
    kill_at_step: int | None = Field(None, ge=1)
    """Testing aid: the main process of a training stage kills itself (SIGKILL) right after
    this optimizer step, to exercise resume after a hard kill. Never set it for a real run."""


# ReferenceTrainingConfig (under AnalyzeConfig) names BuildConfig and TrainConfig, which
# come later in this file.
ReferenceTrainingConfig.model_rebuild()
AnalyzeConfig.model_rebuild()
TrainConfig.model_rebuild()
PipelineConfig.model_rebuild()


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML recipe, apply `key.path=value` overrides, validate.

    Raises ConfigError naming the file, the field and (where known) the line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    try:
        data = yaml.safe_load(text) or {}
        lines = _line_index(yaml.compose(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(data, item, path)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, path, lines, overrides)) from None


def _apply_override(data: dict, item: str, path: Path) -> None:
    if "=" not in item:
        raise ConfigError(f"{path}: override {item!r} is not of the form key.path=value")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{path}: override {item!r}: {k!r} is not a section")
        node = nxt
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: override {item!r}: value is not valid YAML: {e}") from e


def _line_index(node: Any, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            p = (*prefix, k.value)
            out[p] = k.start_mark.line + 1
            out.update(_line_index(v, p))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            p = (*prefix, i)
            out[p] = v.start_mark.line + 1
            out.update(_line_index(v, p))
    return out


def _describe(err: ValidationError, path: Path, lines: dict[tuple, int], overrides) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(str(x) if not isinstance(x, int) else x for x in e["loc"])
        field = ".".join(str(x) for x in loc) or "(top level)"
        line = None
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        where = f"{path}:{line}" if line else str(path)
        from_set = any(o.split("=", 1)[0].strip() == field for o in overrides)
        if from_set:
            where = f"{path} (--set {field})"
        value = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        msgs.append(f"{where}: field {field}: {e['msg']}{value}")
    return "\n".join(msgs)


def config_digest(cfg: BaseModel) -> dict:
    """The JSON form of a config as it enters a key: every field except those declared
    with `unkeyed`, at any depth."""
    return _drop_unkeyed(cfg, cfg.model_dump(mode="json"))


def _drop_unkeyed(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel):
        out = {}
        for name, info in type(value).model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and extra.get("in_key") is False:
                continue
            out[name] = _drop_unkeyed(getattr(value, name), dumped[name])
        return out
    if isinstance(value, list | tuple) and isinstance(dumped, list):
        return [_drop_unkeyed(v, d) for v, d in zip(value, dumped, strict=True)]
    if isinstance(value, dict) and isinstance(dumped, dict):
        return {k: _drop_unkeyed(value[k], dumped[k]) for k in value}
    return dumped
