"""Entry point of every process that `accelerate launch` starts for a stage:

    python -m longrecipe.launched --job JOB.json

The job file (written by longrecipe.launch) names the stage; ENTRIES maps a stage name
to the function that runs it from a job (`module:function`, taking a launch.Job and
returning the artifact). A stage that runs in several processes adds itself here.
A process that stops on bad input (InputError) leaves its message beside the job file,
and the parent raises it again as bad input.
The same command works by hand: `accelerate launch --config_file F -m
longrecipe.launched --job JOB.json`.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from longrecipe.errors import InputError
from longrecipe.launch import LaunchError, rank_and_world, read_job

ENTRIES = {
    "train": "longrecipe.train:run_launched",
    "anneal": "longrecipe.anneal:run_launched",
    "analyze": "longrecipe.analyze:run_launched",
    "evaluate": "longrecipe.evaluate.stage:run_launched",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longrecipe.launched")
    parser.add_argument("--job", required=True, help="JSON job file written by longrecipe")
    args = parser.parse_args(argv)
    job = read_job(args.job)
    rank, world = rank_and_world()
    if world != job.processes:
        raise LaunchError(
            f"{job.stage}: accelerate started {world} process(es) but the job asks for "
            f"{job.processes} (process {rank}); check the accelerate config's launcher flags"
        )
    if job.stage not in ENTRIES:
        raise LaunchError(f"no launched entry for stage {job.stage!r} (known: {', '.join(ENTRIES)})")
    module, name = ENTRIES[job.stage].split(":")
    try:
        getattr(importlib.import_module(module), name)(job)
    except InputError as e:
        # the parent raises it again as bad input (exit 2), with this message
        Path(args.job).with_name(f"input-error-{rank}.txt").write_text(str(e))
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
