"""Peak memory of the tensors an operation creates, measured on any device (CPU included).

``PeakTensorMemory`` is a ``TorchDispatchMode``: every aten op run while it is active
(forward and backward) reports its outputs; each newly allocated storage is counted
until it is freed (tracked with a storage weak reference). Views and in-place results
allocate nothing and are not counted; tensors that existed before (parameters, inputs)
are not counted either. Allocations internal to one op (workspace) are not seen.
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as mem: ...``; then ``mem.peak`` (bytes) and ``mem.current``."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _collect(self) -> None:
        dead = [ptr for ptr, (ref, _) in self._live.items() if ref.expired()]
        for ptr in dead:
            self.current -= self._live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self._collect()
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor._is_view():
                continue
            storage = tensor.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self._live:
                continue
            self._live[ptr] = (StorageWeakRef(storage), nbytes)
            self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out
