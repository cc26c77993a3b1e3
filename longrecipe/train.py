"""Context-extension training (the paper's stage 0) and the accelerate loop it shares
with `anneal`.

`run_train` loads the base model, applies the RoPE change and the target window
(longrecipe.rope), trains on the `samples` table with each sample's own position
ids, and saves a complete Hugging Face folder (config with the new RoPE and
max_position_embeddings, safetensors, tokenizer, generation config) under
`files/model`, plus one `train_metrics` row per optimizer step.

Every forward call passes the position ids AND an explicit attention mask: without
the mask, transformers reads gapped position ids as packed sequences and silently
makes attention block-diagonal (see `causal_lm_forward`).

Checkpoints (model, optimizer, scheduler, RNG, data position, metrics so far) go
to the artifact's scratch folder every `optim.checkpoint_every` steps; a rerun
after a kill resumes from the last one and, on a CPU, reproduces the loss
trajectory of an uninterrupted run exactly.

More than one process (or an accelerate config file) runs the same code under
`accelerate launch` in a subprocess: `python -m longrecipe.train --job FILE`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import (
    AnnealConfig,
    ModelSpec,
    OptimConfig,
    RopeConfig,
    RuntimeConfig,
    TrainConfig,
)
from longrecipe.errors import InputError
from longrecipe.models import ModelError, ModelSource, load_model, load_tokenizer, resolve
from longrecipe.progress import progress_bar

STAGE = "train"
STAGE_VERSION = "train_v1"

METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int32()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("tokens", pa.int64()),
        ("tokens_per_s", pa.float64()),
        ("elapsed_s", pa.float64()),
        ("max_position", pa.int32()),
    ]
)

IGNORE_INDEX = -100
MODEL_DIR = "files/model"


class TrainError(InputError):
    """Bad training input (samples, model, window); the message names the field or row."""


class LaunchError(RuntimeError):
    """`accelerate launch` of the training entry point failed."""


# --------------------------------------------------------------------------- stage


def train_spec(cfg: TrainConfig, samples: ArtifactRef, model: ModelSource) -> StageSpec:
    return StageSpec(STAGE, STAGE_VERSION, cfg, {"samples": samples.key, "model": model.key})


def run_train(
    cfg: TrainConfig,
    samples: ArtifactRef,
    model: ModelSpec | ModelSource | ArtifactRef,
    store: ArtifactStore,
    runtime: RuntimeConfig = RuntimeConfig(),
) -> ArtifactRef:
    """Train `model` on `samples` with the RoPE change and target window of `cfg`."""
    return _run_train(cfg, samples, model, store, runtime, launched=False)


def _run_train(cfg, samples, model, store, runtime, *, launched: bool) -> ArtifactRef:
    src = as_source(model)
    check_weights(src)
    spec = train_spec(cfg, samples, src)
    target = target_window(cfg, samples)
    check_target(target, base_window(src))
    if not launched and needs_launch(cfg.optim):
        return launch(STAGE, cfg, {"samples": samples, "model": model}, spec, store, runtime)

    def body(w: StageWriter) -> None:
        train_model(
            src, samples, cfg.optim, w, runtime,
            rope=cfg.rope, target=target, save_dtype=cfg.save_dtype, label=STAGE,
            launched=launched,
        )

    return produce(store, spec, body)


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


def check_target(target: int, base: int | None) -> None:
    if base is not None and target < base:
        raise TrainError(
            f"train target window {target} (train.max_position_embeddings or "
            f"build.target_len) is shorter than the model's window {base}: "
            "context extension needs a target at least as long"
        )


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


# --------------------------------------------------------------------------- the loop


def train_model(
    src: ModelSource,
    samples: ArtifactRef,
    optim: OptimConfig,
    w: StageWriter,
    runtime: RuntimeConfig,
    *,
    rope: RopeConfig | None,
    target: int | None,
    save_dtype: str,
    label: str,
    launched: bool = False,
) -> None:
    """Load, (re)configure RoPE, fit, save the HF folder and metrics: the body of train and anneal."""
    import torch

    from longrecipe.models import pick_attention
    from longrecipe.rope import apply_rope

    with _threads(runtime.threads), quiet_transformers():
        acc = make_accelerator(runtime, optim, w)
        attention = pick_attention(optim.attention, acc.device.type)
        model = load_model(src, dtype=torch.float32, device="cpu", attention=attention)
        window = model.config.max_position_embeddings
        if target is not None:
            check_target(target, window)
        rope_params = apply_rope(model, rope, target, training=True)
        result = fit(model, samples, optim, w, runtime, acc, label=label)
        # gathering a sharded model is collective: every process takes part
        full_state = acc.get_state_dict(result.model) if _sharded(acc) else None
        if acc.is_main_process:
            folder = w.local_dir / MODEL_DIR
            save_model_folder(acc, result.model, load_tokenizer(src), folder, save_dtype, full_state)
            w.write_table("train_metrics", pa.Table.from_pylist(result.metrics, METRICS_SCHEMA))
        w.info.update(
            label=label,
            base_model=src.key,
            base_window=window,
            max_position_embeddings=model.config.max_position_embeddings,
            rope_parameters=rope_params,
            attention=attention,
            device=acc.device.type,
            num_processes=acc.num_processes,
            launched=launched,
            steps=len(result.metrics),
            tokens=result.metrics[-1]["tokens"] if result.metrics else 0,
            final_loss=result.metrics[-1]["loss"] if result.metrics else None,
            lr_after_last_step=result.final_lr,
            resumed_from_step=result.resumed_from,
            max_position_seen=max((m["max_position"] for m in result.metrics), default=0),
        )
        acc.end_training()


@dataclass
class FitResult:
    model: Any
    metrics: list[dict]
    final_lr: float
    resumed_from: int = 0


def fit(model, samples: ArtifactRef, optim: OptimConfig, w: StageWriter, runtime: RuntimeConfig,
        acc, *, label: str = "train") -> FitResult:
    """The training loop. Returns the (prepared) model and one metrics row per optimizer step."""
    import torch

    torch.manual_seed(optim.seed)
    stream = SampleStream(samples, optim.seed)
    model.train()
    model.config.use_cache = False
    if optim.gradient_checkpointing:
        _activation_checkpointing(model, True)
    opt = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    model, opt = acc.prepare(model, opt)
    # the scheduler is stepped by us once per optimizer step (accelerate's wrapper would
    # step it once per process)
    sched = make_schedule(opt, optim)
    window = acc.unwrap_model(model).config.max_position_embeddings
    pad_id = _pad_id(acc.unwrap_model(model))
    autocast = optim.precision == "bf16" and acc.mixed_precision == "no"
    max_norm = optim.max_grad_norm or math.inf

    state = TrainState()
    ckpt = latest_checkpoint(w.scratch)
    if ckpt is not None:
        state = load_checkpoint(ckpt, acc, model, opt, sched)
    resumed_from = state.step
    world, rank = acc.num_processes, acc.process_index
    params = [p for p in model.parameters() if p.requires_grad]

    show = runtime.progress and acc.is_main_process
    with progress_bar(label, show, unit="steps", total=optim.max_steps) as bar:
        bar.advance(state.step)
        while state.step < optim.max_steps:
            started = time.perf_counter()
            micro = []
            for _ in range(optim.grad_accum):
                first = state.position + rank * optim.batch_size
                micro.append(stream.take(first, optim.batch_size))
                state.position += optim.batch_size * world
            n_labels = sum(len(s.input_ids) - 1 for b in micro for s in b)
            step_tokens = sum(len(s.input_ids) for b in micro for s in b)
            max_pos = max(int(s.position_ids.max()) for b in micro for s in b)
            if max_pos >= window:
                bad = next(s for b in micro for s in b if int(s.position_ids.max()) >= window)
                raise TrainError(
                    f"{samples.stage}/{samples.key}: sample {bad.sample_id!r} has position id "
                    f"{int(bad.position_ids.max())} >= the model's max_position_embeddings {window}"
                )
            loss_sum = torch.zeros((), device=acc.device)
            for batch in micro:
                ids, pos, mask, labels = collate(batch, pad_id, acc.device)
                # accumulate(): no gradient sync (DDP) and no DeepSpeed step before the last
                # micro-batch. The loss is this micro-batch's label-token sum over the whole
                # step's label tokens; accelerate divides by grad_accum, so it is scaled back
                with acc.accumulate(model):
                    with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=autocast):
                        out = causal_lm_forward(
                            model, ids, pos, mask, labels=labels,
                            num_items_in_batch=max(n_labels, 1),
                        )
                    acc.backward(out.loss * optim.grad_accum)
                loss_sum += out.loss.detach()
            assert acc.sync_gradients, "micro-batches out of step with gradient accumulation"
            grad_norm = acc.clip_grad_norm_(params, max_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

            totals = torch.tensor(
                [loss_sum.item(), float(step_tokens), float(max_pos)], device=acc.device
            )
            if world > 1:
                totals = torch.stack([
                    acc.reduce(totals[0], "mean"), acc.reduce(totals[1], "sum"),
                    acc.reduce(totals[2], "max"),
                ])
            loss, tokens, max_pos = float(totals[0]), int(totals[1]), int(totals[2])
            seconds = time.perf_counter() - started
            state.step += 1
            state.elapsed += seconds
            state.tokens += tokens
            row = {
                "step": state.step,
                "loss": loss,
                "lr": float(lr),
                "grad_norm": float(grad_norm),
                "tokens": state.tokens,
                "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                "elapsed_s": state.elapsed,
                "max_position": max_pos,
            }
            state.metrics.append(row)
            if acc.trackers:
                acc.log({f"{label}/{k}": v for k, v in row.items() if k != "step"}, step=state.step)
            bar.advance(1)
            bar.note(f"loss {loss:.4f} lr {lr:.1e} {row['tokens_per_s']:,.0f} tok/s")
            every = optim.checkpoint_every
            if every and state.step % every == 0 and state.step < optim.max_steps:
                save_checkpoint(w.scratch, state, acc, model, opt, sched)
    return FitResult(model, state.metrics, float(sched.get_last_lr()[0]), resumed_from)


def causal_lm_forward(model, input_ids, position_ids, attention_mask=None, **kwargs):
    """One training/scoring forward: explicit position ids, an explicit attention mask
    (all ones when none is given) and no KV cache.

    The mask is what keeps attention fully causal: with gapped position ids, no mask
    and no cache, transformers treats every gap as the start of a new packed
    sequence and attention becomes block-diagonal, silently.
    """
    import torch

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=False,
        **kwargs,
    )


def collate(batch: list[Sample], pad_id: int, device) -> tuple:
    """Right-pad a micro-batch: ids, positions, mask (ones on real tokens), labels
    (the ids, -100 on padding; the model shifts them by one)."""
    import torch

    n = max(len(s.input_ids) for s in batch)
    ids = np.full((len(batch), n), pad_id, dtype=np.int64)
    pos = np.zeros((len(batch), n), dtype=np.int64)
    mask = np.zeros((len(batch), n), dtype=np.int64)
    labels = np.full((len(batch), n), IGNORE_INDEX, dtype=np.int64)
    for i, s in enumerate(batch):
        k = len(s.input_ids)
        ids[i, :k] = s.input_ids
        pos[i, :k] = s.position_ids
        mask[i, :k] = 1
        labels[i, :k] = s.input_ids
    return tuple(torch.from_numpy(a).to(device) for a in (ids, pos, mask, labels))


def make_schedule(opt, optim: OptimConfig):
    """Warmup then constant, cosine to zero or linear to zero (transformers' schedules).

    The learning rate used at step k (1-based) is the schedule after k - 1 steps, so
    the schedule reaches exactly zero after the last step.
    """
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if optim.schedule == "constant":
        return get_constant_schedule_with_warmup(opt, optim.warmup_steps)
    make = get_cosine_schedule_with_warmup if optim.schedule == "cosine" else get_linear_schedule_with_warmup
    return make(opt, optim.warmup_steps, optim.max_steps)


def make_accelerator(runtime: RuntimeConfig, optim: OptimConfig, w: StageWriter | None = None):
    """An Accelerator on the runtime's device. Mixed precision is torch.autocast in the
    loop (accelerate keeps one process-wide precision, and tests switch it), unless a
    launched process was given one."""
    import importlib.util

    from accelerate import Accelerator

    from longrecipe.models import pick_device

    device = pick_device(runtime.device)
    kwargs: dict[str, Any] = {"cpu": device == "cpu", "gradient_accumulation_steps": optim.grad_accum}
    if w is not None and importlib.util.find_spec("tensorboard") is not None:
        kwargs.update(log_with="tensorboard", project_dir=str(w.local_dir / "files"))
    acc = Accelerator(**kwargs)
    if acc.log_with:
        acc.init_trackers("tensorboard")
    return acc


# --------------------------------------------------------------------------- data


@dataclass
class Sample:
    sample_id: Any
    input_ids: np.ndarray
    position_ids: np.ndarray


class SampleStream:
    """Samples in a seeded order, epoch after epoch, addressed by a global position so a
    resumed run picks up exactly where the killed one stopped.

    The order shuffles the parts, then the rows inside each part: a whole part is read
    once per visit, never one row at a time from all over the table.
    """

    def __init__(self, ref: ArtifactRef, seed: int):
        if "samples" not in ref.tables():
            raise TrainError(f"{ref.stage}/{ref.key} has no `samples` table to train on")
        self.ref, self.seed = ref, seed
        self.files = ref.files("samples")
        self.rows = [f["rows"] for f in ref.manifest["files"] if f.get("table") == "samples"]
        self.total = sum(self.rows)
        if self.total == 0:
            raise TrainError(f"{ref.stage}/{ref.key}: the `samples` table is empty")
        import pyarrow.parquet as pq

        names = pq.read_schema(self.files[0], filesystem=ref.fs).names
        missing = [c for c in ("sample_id", "input_ids", "position_ids") if c not in names]
        if missing:
            raise TrainError(
                f"{ref.stage}/{ref.key}: the `samples` table has no column {', '.join(missing)}"
            )
        self._epoch: int | None = None
        self._order: tuple[np.ndarray, np.ndarray] | None = None
        self._part: tuple[int, dict] | None = None

    def take(self, first: int, n: int) -> list[Sample]:
        return [self.get(first + i) for i in range(n)]

    def get(self, index: int) -> Sample:
        epoch, i = divmod(index, self.total)
        parts, rows = self._epoch_order(epoch)
        return self._row(int(parts[i]), int(rows[i]))

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            parts, rows = [], []
            for p in rng.permutation(len(self.rows)):
                parts.append(np.full(self.rows[p], p))
                rows.append(rng.permutation(self.rows[p]))
            self._epoch, self._order = epoch, (np.concatenate(parts), np.concatenate(rows))
        assert self._order is not None
        return self._order

    def _row(self, part: int, row: int) -> Sample:
        if self._part is None or self._part[0] != part:
            import pyarrow.parquet as pq

            t = pq.read_table(
                self.files[part], columns=["sample_id", "input_ids", "position_ids"],
                filesystem=self.ref.fs,
            )
            self._part = (part, {
                "sample_id": t.column("sample_id").to_pylist(),
                "input_ids": _flat(t.column("input_ids")),
                "position_ids": _flat(t.column("position_ids")),
            })
        d = self._part[1]
        (ids_off, ids), (pos_off, pos) = d["input_ids"], d["position_ids"]
        sid = d["sample_id"][row]
        s = Sample(sid, ids[ids_off[row]:ids_off[row + 1]], pos[pos_off[row]:pos_off[row + 1]])
        if len(s.input_ids) != len(s.position_ids) or len(s.input_ids) < 2:
            raise TrainError(
                f"{self.ref.stage}/{self.ref.key}: sample {sid!r} has {len(s.input_ids)} "
                f"input ids and {len(s.position_ids)} position ids (need equal, at least 2)"
            )
        return s


def _flat(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks()
    return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState:
    step: int = 0
    position: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    metrics: list[dict] = field(default_factory=list)


def save_checkpoint(scratch: Path, state: TrainState, acc, model, opt, sched) -> Path:
    """model.safetensors, optimizer.safetensors + optimizer.json, scheduler.json,
    rng.safetensors, state.json (written last; no pickle anywhere); then renamed into place.
    Sharded setups (FSDP, DeepSpeed) store their states with accelerate's save_state."""
    import torch
    from safetensors.torch import save_file, save_model

    final = scratch / f"ckpt-{state.step:08d}"
    tmp = scratch / f".ckpt-{state.step:08d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if _sharded(acc):
        acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
    elif acc.is_main_process:
        save_model(acc.unwrap_model(model), str(tmp / "model.safetensors"))
        save_optimizer(opt, tmp)
        (tmp / "scheduler.json").write_text(json.dumps(sched.state_dict()))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / f"rng-{acc.process_index}.safetensors"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "state.json").write_text(json.dumps({
            "step": state.step, "position": state.position, "tokens": state.tokens,
            "elapsed": state.elapsed, "metrics": state.metrics,
        }))
        tmp.rename(final)
        for old in scratch.glob("ckpt-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def latest_checkpoint(scratch: Path) -> Path | None:
    done = sorted(p for p in scratch.glob("ckpt-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, acc, model, opt, sched) -> TrainState:
    import torch
    from safetensors.torch import load_file, load_model

    if _sharded(acc):
        acc.load_state(str(path / "accelerate"))
    else:
        load_model(acc.unwrap_model(model), str(path / "model.safetensors"), device=str(acc.device))
        load_optimizer(opt, path, acc.device)
        sched.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng_file = path / f"rng-{acc.process_index}.safetensors"
    if rng_file.exists():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    s = json.loads((path / "state.json").read_text())
    return TrainState(s["step"], s["position"], s["tokens"], s["elapsed"], s["metrics"])


def save_optimizer(opt, folder: Path) -> None:
    """Optimizer state without pickle: tensors in safetensors, the rest in JSON."""
    import torch
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors, state = {}, {}
    for idx, entries in sd["state"].items():
        state[str(idx)] = {}
        for name, v in entries.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().contiguous()
                state[str(idx)][name] = {"tensor": f"{idx}.{name}"}
            else:
                state[str(idx)][name] = {"value": v}
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"state": state, "param_groups": sd["param_groups"]}))


def load_optimizer(opt, folder: Path, device) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    meta = json.loads((folder / "optimizer.json").read_text())
    state = {
        int(idx): {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entries.items()}
        for idx, entries in meta["state"].items()
    }
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


# --------------------------------------------------------------------------- saving


def save_model_folder(acc, model, tokenizer, folder: Path, dtype: str,
                      state_dict: dict | None = None) -> None:
    """A folder that AutoModelForCausalLM and AutoTokenizer load as is. `state_dict`: the
    gathered weights of a sharded model (else the model's own are saved)."""
    import torch

    m = acc.unwrap_model(model)
    _activation_checkpointing(m, False)
    m.config.use_cache = True
    m.eval()
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    if state_dict is None:
        m.to(torch_dtype)
    else:  # a sharded model's local parameters are partitions: cast the gathered copy
        state_dict = {k: v.to(torch_dtype) for k, v in state_dict.items()}
    folder.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
    if state_dict is not None:
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = dtype
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(folder))


def check_weights(src: ModelSource) -> None:
    """A local folder must hold weights, not only a config."""
    if src.kind != "folder":
        return
    assert src.path is not None
    patterns = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
    if not any(any(src.path.glob(p)) for p in patterns):
        raise ModelError(
            f"model folder {src.path} has a config.json but no weights "
            "(*.safetensors or pytorch_model*.bin)"
        )


def as_source(model: ModelSpec | ModelSource | ArtifactRef) -> ModelSource:
    return model if isinstance(model, ModelSource) else resolve(model)


# --------------------------------------------------------------------------- processes


def needs_launch(optim: OptimConfig) -> bool:
    """More than one process, or an accelerate config file: run under `accelerate launch`."""
    return optim.num_processes > 1 or optim.accelerate_config is not None


def produce(store: ArtifactStore, spec: StageSpec, body: Callable[[StageWriter], None]) -> ArtifactRef:
    """store.produce on the main process; the other processes of a launched run train in
    the same partial folder (writing nothing) and wait for the main one's commit."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1 or rank == 0:
        return store.produce(spec, body)
    ref = store.get(spec.stage, spec.key)
    if ref is not None:
        return ref
    body(StageWriter(store, spec, f"{store.dir(spec.stage, spec.key)}.partial"))
    for _ in range(600):
        ref = store.get(spec.stage, spec.key)
        if ref is not None:
            return ref
        time.sleep(0.5)
    raise LaunchError(f"process {rank}: {spec.stage}/{spec.key} was not committed by process 0")


def launch(stage: str, cfg: TrainConfig | AnnealConfig, inputs: dict, spec: StageSpec,
           store: ArtifactStore, runtime: RuntimeConfig) -> ArtifactRef:
    """Run the stage under `accelerate launch` in a subprocess and return its artifact."""
    ref = store.get(spec.stage, spec.key)
    if ref is not None:
        return ref
    optim = cfg.optim
    job = {
        "stage": stage,
        "store": store.root,
        "config": cfg.model_dump(mode="json"),
        "runtime": runtime.model_dump(mode="json"),
        "inputs": {k: _encode_input(v) for k, v in inputs.items()},
    }
    with tempfile.TemporaryDirectory(prefix="longrecipe-launch-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        cmd = launch_command(optim, runtime, job_file)
        env = {
            **os.environ,
            "HF_HOME": os.environ.get("HF_HOME", str(Path(tmp) / "hf")),
            # `-m longrecipe.train` after `import longrecipe` (which re-exports it) makes
            # runpy warn about a module imported twice; main() is safe either way
            "PYTHONWARNINGS": "ignore::RuntimeWarning:runpy",
        }
        proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise LaunchError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return store.require(spec.stage, spec.key)


def launch_command(optim: OptimConfig, runtime: RuntimeConfig, job_file: Path) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if optim.accelerate_config:
        cmd += ["--config_file", optim.accelerate_config]
    cmd += ["--num_processes", str(optim.num_processes)]
    if runtime.device == "cpu":
        cmd += ["--cpu"]
    cmd += ["--mixed_precision", "bf16" if optim.precision == "bf16" else "no"]
    return cmd + ["-m", "longrecipe.train", "--job", str(job_file)]


def _encode_input(v: Any) -> dict:
    if isinstance(v, ArtifactRef):
        return {"artifact": [v.stage, v.key]}
    if isinstance(v, ModelSource):
        v = v.spec
    if isinstance(v, ModelSpec):
        return {"model": v.model_dump(mode="json")}
    raise TypeError(f"cannot pass {type(v).__name__} to a launched process")


def _decode_input(store: ArtifactStore, v: dict) -> Any:
    if "artifact" in v:
        return store.require(*v["artifact"])
    return ModelSpec.model_validate(v["model"])


def main(argv: list[str] | None = None) -> int:
    """Entry point of a launched process: `accelerate launch -m longrecipe.train --job FILE`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m longrecipe.train")
    parser.add_argument("--job", required=True, help="JSON job file written by longrecipe")
    args = parser.parse_args(argv)
    job = json.loads(Path(args.job).read_text())
    store = ArtifactStore(job["store"])
    runtime = RuntimeConfig.model_validate(job["runtime"])
    inputs = {k: _decode_input(store, v) for k, v in job["inputs"].items()}
    if job["stage"] == STAGE:
        cfg = TrainConfig.model_validate(job["config"])
        _run_train(cfg, inputs["samples"], inputs["model"], store, runtime, launched=True)
    elif job["stage"] == "anneal":
        from longrecipe.anneal import _run_anneal

        cfg = AnnealConfig.model_validate(job["config"])
        _run_anneal(cfg, inputs["model"], inputs["replay_samples"], store, runtime, launched=True)
    else:
        raise SystemExit(f"unknown stage {job['stage']!r}")
    return 0


# --------------------------------------------------------------------------- helpers


def _activation_checkpointing(model, on: bool) -> None:
    # transformers 5.x renamed gradient_* to activation_checkpointing_*; accept both
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    elif not hasattr(model, "is_activation_checkpointing") and model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()


def _pad_id(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad or 0)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' own load/save bars inside a stage (the stage shows its own)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
