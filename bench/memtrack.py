"""Tensor memory high-water mark on a CPU (torch has max_memory_allocated for CUDA only).

`TensorMemory` is a TorchDispatchMode: every tensor storage an operator creates while it
is active is counted until the storage is freed (a weakref finalizer), forward and
backward alike (autograd runs CPU backward on the calling thread). `peak` is the most
bytes alive at once, counting the tensors that existed before (pass them as
`existing`: their storages count once, views and in-place results of them never
again). Memory that
kernels allocate internally without returning a tensor is not seen; the process's
allocator overhead neither (compare ru_maxrss for that).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    def __init__(self, existing=()):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in existing if isinstance(t, torch.Tensor)}
        self.live: dict[int, int] = {}
        self.current = self.peak = storage_bytes(existing)

    def _count(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        key, n = storage.data_ptr(), storage.nbytes()
        if n == 0 or key in self.live or key in self.known:
            return
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        n = self.live.pop(key, None)
        if n is not None:
            self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._count(t)
        return out


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())
