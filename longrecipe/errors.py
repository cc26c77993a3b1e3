"""The one error family that means "bad input": the CLI exits 2 on it, a Prefect task
does not retry it. Everything else that escapes a stage is a failure (exit 1)."""


class InputError(ValueError):
    """Bad input: a config, file, row or model the user must fix. The message names it."""
