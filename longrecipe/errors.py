"""The one error family that means "bad input": the CLI exits 2 on it, a Prefect task
does not retry it. Everything else that escapes a stage is a failure (exit 1); a full disk
is one of those, never retried, reported in one line that names the path."""

import errno


class InputError(ValueError):
    """Bad input: a config, file, row or model the user must fix. The message names it."""


class DiskFullError(OSError):
    """No space left on the disk a file was being written to; the message names the file."""

    def __init__(self, path: str):
        super().__init__(errno.ENOSPC, "no space left on the disk", str(path))
        self.path = str(path)

    def __str__(self) -> str:
        return f"no space left on the disk holding {self.path}"


_FULL = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an error, or one it was raised from, says the disk is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(exc) for s in _FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
