"""Running a stage in several processes under `accelerate launch`, for any stage.

The parent (the stage function, in the Prefect task or a script) writes a job file and
starts

    python -m accelerate.commands.launch [--config_file FILE] --num_processes N \\
        [--multi_gpu | --cpu] --mixed_precision P -m longrecipe.launched --job JOB.json

then waits and returns the committed artifact. Each launched process reads the job,
checks it is one of N processes, and calls the stage's entry in the dispatch table of
`longrecipe.launched`. Inside, `produce` replaces `store.produce`: process 0 holds the
key's lock and commits the artifact after every other process has marked its share
done (a file in the partial folder's scratch, named by the job id); the others work in
the same partial folder and wait for the commit. Nothing here knows about training:
a stage whose processes each compute a share of the parts uses the same three pieces
(job file, dispatch entry, `produce`), with `assign_shares` (which parts are whose),
`process_runtime` (each process's device) and `produce`'s `finish` (what process 0
does once every share exists: analyze's corpus-wide steps, evaluate's summary).

Job file (JSON, `format: longrecipe.job/1`): `id`, `stage`, `store` (root), `processes`,
`config` (the stage config, every field), `runtime` (RuntimeConfig), `inputs` (name ->
{"artifact": [stage, key]} or {"model": ModelSpec}).

CPU runs: accelerate's `--cpu` always takes its one-process launcher (two processes
asked for, one run, and no word about it), so several CPU processes go through its
torchrun launcher (`--multi_gpu`) and each process asks accelerate for the CPU
itself, which gives DDP over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from longrecipe.artifacts import ArtifactRef, ArtifactStore, StageSpec, StageWriter
from longrecipe.config import ModelSpec, RuntimeConfig
from longrecipe.errors import InputError
from longrecipe.models import ModelSource

JOB_FORMAT = "longrecipe.job/1"
WAIT_S = 24 * 3600  # a launched process waits this long at most for the others
_POLL_S = 0.2


class LaunchError(RuntimeError):
    """`accelerate launch` of a stage failed, or its processes disagree."""


class LaunchConfigError(InputError):
    """A launch that cannot do what its config asks (bad accelerate file, unsupported setup)."""


class LaunchedInputError(InputError):
    """A launched process stopped on bad input; the message is that process's."""


@dataclass(frozen=True)
class Job:
    """A launched process's view of its job file, inputs decoded."""

    id: str
    stage: str
    store: ArtifactStore
    processes: int
    config: dict
    runtime: RuntimeConfig
    inputs: dict[str, Any]


# --------------------------------------------------------------------------- accelerate files


def accelerate_file(path: str | None) -> dict:
    """An accelerate config file's content ({} when none); a missing or bad file names itself."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise LaunchConfigError(f"accelerate config {path}: cannot read it: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise LaunchConfigError(f"accelerate config {path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise LaunchConfigError(f"accelerate config {path}: the top level must be a mapping")
    return data


def distributed_kind(path: str | None) -> str:
    """"deepspeed", "fsdp", "ddp" or "none", from an accelerate file's distributed_type."""
    kind = str(accelerate_file(path).get("distributed_type", "NO")).upper()
    return {"DEEPSPEED": "deepspeed", "FSDP": "fsdp"}.get(kind, "ddp" if kind.startswith("MULTI_") else "none")


def resolve_processes(num_processes: int | None, accelerate_config: str | None) -> int:
    """The number of processes: the config's, else the accelerate file's, else 1."""
    if num_processes is not None:
        return num_processes
    return int(accelerate_file(accelerate_config).get("num_processes", 1) or 1)


# --------------------------------------------------------------------------- the parent


def launch(spec: StageSpec, config: BaseModel, inputs: dict[str, Any], store: ArtifactStore,
           runtime: RuntimeConfig, *, processes: int, accelerate_config: str | None,
           mixed_precision: str) -> ArtifactRef:
    """Run the stage of `spec` under `accelerate launch` and return its artifact."""
    ref = store.get(spec.stage, spec.key)
    if ref is not None:
        return ref
    from longrecipe.models import pick_device

    device = pick_device(runtime.device)
    gpu = pinned_gpu(device)
    if gpu is not None:
        if processes > 1:
            raise LaunchConfigError(
                f"{spec.stage}: the run's device {device} is one GPU, but the stage asks for "
                f"{processes} processes; run it on device cuda (or auto) and name its GPUs in "
                "the accelerate config (gpu_ids)"
            )
        # the child sees that one GPU only, as its `cuda`
        runtime = runtime.model_copy(update={"device": "cuda"})
        device = "cuda"
    kind = distributed_kind(accelerate_config)
    if kind == "fsdp" and device == "cpu":
        raise LaunchConfigError(
            f"accelerate config {accelerate_config}: FSDP on a CPU is not supported by accelerate "
            "1.15 (it applies FSDP only on GPU-like devices and would train with plain DDP "
            "instead); use a GPU, configs/accelerate/ddp.yaml, or DeepSpeed"
        )
    job = {
        "format": JOB_FORMAT,
        "id": uuid.uuid4().hex[:12],
        "stage": spec.stage,
        "store": store.root,
        "processes": processes,
        "config": config.model_dump(mode="json"),
        "runtime": runtime.model_dump(mode="json"),
        "inputs": {k: _encode_input(v) for k, v in inputs.items()},
    }
    with tempfile.TemporaryDirectory(prefix="longrecipe-launch-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        cmd = launch_command(job_file, processes=processes, accelerate_config=accelerate_config,
                             mixed_precision=mixed_precision, device=device)
        env = {**os.environ, "HF_HOME": os.environ.get("HF_HOME", str(Path(tmp) / "hf"))}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        proc = subprocess.run(cmd, env=env)
        bad_input = sorted(Path(tmp).glob("input-error-*.txt"))
        if proc.returncode != 0 and bad_input:
            raise LaunchedInputError(bad_input[0].read_text())
    if proc.returncode != 0:
        raise LaunchError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return store.require(spec.stage, spec.key)


def pinned_gpu(device: str) -> str | None:
    """For `cuda:N`, the CUDA_VISIBLE_DEVICES value that shows a child process that GPU
    alone (the N-th of the parent's own CUDA_VISIBLE_DEVICES, when it has one); None for
    any other device."""
    from longrecipe.models import cuda_index

    index = cuda_index(device)
    if index is None:
        return None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if visible else str(index)


def launch_command(job_file: Path, *, processes: int, accelerate_config: str | None,
                   mixed_precision: str, device: str) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    settings = accelerate_file(accelerate_config)
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    cmd += ["--num_processes", str(processes)]
    if int(settings.get("num_machines", 1) or 1) <= 1:
        cmd += ["--num_machines", "1", "--main_process_port", "0"]  # 0: a free port
    if distributed_kind(accelerate_config) in ("deepspeed", "fsdp"):
        pass  # the file picks accelerate's DeepSpeed / FSDP launcher (never `--cpu`)
    elif processes > 1:
        cmd += ["--multi_gpu"]  # torchrun; on a CPU each process asks for the CPU (gloo)
    elif device == "cpu":
        cmd += ["--cpu"]
    cmd += ["--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    return cmd + ["-m", "longrecipe.launched", "--job", str(job_file)]


def _encode_input(v: Any) -> dict:
    if isinstance(v, ArtifactRef):
        return {"artifact": [v.stage, v.key]}
    if isinstance(v, ModelSource):  # as resolved, identity included: a model artifact's
        # identity is its key, not the content hash its folder would resolve to
        return {"source": {"kind": v.kind, "path": None if v.path is None else str(v.path),
                           "identity": v.identity, "spec": v.spec.model_dump(mode="json")}}
    if isinstance(v, ModelSpec):
        return {"model": v.model_dump(mode="json")}
    if isinstance(v, str | Path):
        return {"path": str(v)}
    raise TypeError(f"cannot pass {type(v).__name__} to a launched process")


# --------------------------------------------------------------------------- a launched process


def read_job(path: str | Path) -> Job:
    data = json.loads(Path(path).read_text())
    if data.get("format") != JOB_FORMAT:
        raise LaunchError(f"{path}: not a {JOB_FORMAT} job file")
    store = ArtifactStore(data["store"])
    inputs = {k: _decode_input(store, v) for k, v in data["inputs"].items()}
    return Job(data["id"], data["stage"], store, int(data["processes"]), data["config"],
               RuntimeConfig.model_validate(data["runtime"]), inputs)


def _decode_input(store: ArtifactStore, v: dict) -> Any:
    if "artifact" in v:
        return store.require(*v["artifact"])
    if "source" in v:
        src = v["source"]
        return ModelSource(src["kind"], None if src["path"] is None else Path(src["path"]),
                           src["identity"], ModelSpec.model_validate(src["spec"]))
    if "path" in v:
        return Path(v["path"])
    return ModelSpec.model_validate(v["model"])


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's environment)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def produce(store: ArtifactStore, spec: StageSpec, body: Callable[[StageWriter], Any],
            job: Job | None = None,
            finish: Callable[[StageWriter, list[Any]], None] | None = None) -> ArtifactRef:
    """`store.produce` for a stage that may run in several processes.

    In process (job None) or in a one-process job it is store.produce. Otherwise process
    0 holds the lock, runs `body`, waits until every other process has marked its body
    done, and commits; the others run `body` on the same partial folder (writing only
    their own share), mark it done and wait for the commit. `finish(w, shares)`, when
    given, runs once after every body, in process 0 only, before the commit: what needs
    every share (a corpus-wide statistic, a summary). `shares` holds what each process's
    body returned (JSON-able), in rank order.
    """
    rank, world = rank_and_world()

    def whole(w: StageWriter) -> None:
        share = body(w)
        if finish is not None:
            finish(w, [share])

    if job is None or world == 1:
        return store.produce(spec, whole)
    partial = f"{store.dir(spec.stage, spec.key)}.partial"
    if rank == 0:
        def body_then_wait(w: StageWriter) -> None:
            share = body(w)
            marks = [_mark(w.scratch, job, r) for r in range(1, world)]
            _wait(lambda: all(m.exists() for m in marks),
                  f"process 0: processes 1..{world - 1} did not finish {spec.stage}/{spec.key}")
            others = [json.loads(m.read_text() or "{}") for m in marks]
            w.resumed_parts += sum(o.get("resumed_parts", 0) for o in others)
            if finish is not None:
                finish(w, [share, *(o.get("share") for o in others)])

        return store.produce(spec, body_then_wait)
    ref = store.get(spec.stage, spec.key)
    if ref is not None:
        return ref
    w = StageWriter(store, spec, partial)
    share = body(w)
    mark = _mark(w.scratch, job, rank)
    tmp = mark.with_name(f"{mark.name}.tmp")
    tmp.write_text(json.dumps({"share": share, "resumed_parts": w.resumed_parts}))
    tmp.replace(mark)  # the mark exists only with its content
    _wait(lambda: store.get(spec.stage, spec.key) is not None,
          f"process {rank}: {spec.stage}/{spec.key} was not committed by process 0")
    return store.require(spec.stage, spec.key)


def assign_shares(costs: list[float], world: int) -> list[int]:
    """The process (rank) of each part: largest first to the least loaded process (ties:
    the lower part index, the lower rank). The same costs give the same plan in every
    process, with no message passed; parts a rerun finds finished are simply skipped
    by their owner."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load, owner = [0.0] * world, [0] * len(costs)
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += costs[i]
    return owner


def process_runtime(runtime: RuntimeConfig) -> RuntimeConfig:
    """The runtime of one process of a launched job: the device accelerate gives it (its
    own GPU, cuda:LOCAL_RANK, under a multi-GPU launch; the CPU on a CPU run)."""
    from accelerate import PartialState

    from longrecipe.models import pick_device

    device = pick_device(runtime.device)
    state = PartialState(cpu=device == "cpu")
    return runtime.model_copy(update={"device": "cpu" if state.device.type == "cpu"
                                      else str(state.device)})


def _mark(scratch: Path, job: Job, rank: int) -> Path:
    folder = scratch / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{job.id}-{rank}.done"


def _wait(ready: Callable[[], bool], message: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if time.monotonic() > deadline:
            raise LaunchError(message)
        time.sleep(_POLL_S)
