"""The peak of the bytes of tensors alive at once while some code runs on the CPU, where there is no
torch.cuda.max_memory_allocated: a dispatch mode sees every tensor an op makes (forward and backward) and a weak
reference to its storage sees it freed. Tensors made before (weights) are not counted."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakBytes(TorchDispatchMode):
    """with PeakBytes() as p: ...; p.peak is the most bytes that storages made inside were alive at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._alive and self._alive[key]() is storage or not storage.nbytes():
                continue
            nbytes = storage.nbytes()
            self._alive[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._freed(key, nbytes))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out
