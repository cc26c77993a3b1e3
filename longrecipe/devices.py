"""Device slots: where the branches of a concurrent comparison run.

A branch (the base model's evaluation, or one method's build, train, anneal, merge and
evaluation) takes a free device for its whole length and gives it back at the end, so
no two branches share a device unless the list names it twice (`[cpu, cpu]`: two CPU
slots). The device only says where a stage runs; it never enters a key.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator

from longrecipe.models import ModelError, is_cuda, pick_device


def branch_devices(devices: list[str] | int | None, run_device: str = "auto") -> list[str]:
    """The slots of `compare.devices`: the list as given, a count N as cuda:0..N-1 when
    the run uses CUDA (else N CPU slots), None as the run's one device. Each is checked
    against what torch sees before any branch starts."""
    device = pick_device(run_device)
    if devices is None:
        return [device]
    if isinstance(devices, int):
        if not is_cuda(device):
            return ["cpu"] * devices
        out = [f"cuda:{i}" for i in range(devices)]
    else:
        out = list(devices)
    for d in out:
        try:
            pick_device(d)
        except ModelError as e:
            raise ModelError(f"compare.devices: {e}") from None
    return out


class DeviceSlots:
    """A pool of devices shared by the threads that run branches."""

    def __init__(self, devices: list[str]):
        if not devices:
            raise ValueError("no devices to run on")
        self.devices = list(devices)
        self._free: queue.Queue[str] = queue.Queue()
        for d in self.devices:
            self._free.put(d)

    @property
    def concurrent(self) -> bool:
        """More than one branch runs at a time."""
        return len(self.devices) > 1

    @contextlib.contextmanager
    def take(self) -> Iterator[str]:
        """A free device for the duration of the block (waits for one)."""
        device = self._free.get()
        try:
            yield device
        finally:
            self._free.put(device)
