"""Reading a saved PyTorch file safely, and the state dict in it: written once for every loader.

Project checkpoints, training resume (``engine.checkpoint``), Detic and EfficientNet
weights all come through :func:`load_tensor_file` (``torch.load(weights_only=True)``: a
file asking for more than tensors and plain containers is refused unexecuted) and
:func:`model_state` (a bare state dict, or ``{"model": state_dict, ...}``; a DDP
wrapper's ``module.`` prefixes removed). Kept free of ``transformers`` so light loaders
can use it, and outside ``models/`` so the training engine (which imports no model module)
reads its checkpoints through it too.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping

import torch
from torch import Tensor

from part_distillation.errors import CheckpointMismatchError, UnsafePickleError


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_tensor_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file: a file
    that asks for more than tensors and plain containers is refused unexecuted
    (:class:`UnsafePickleError`), a truncated or foreign file is a :class:`CheckpointMismatchError`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a global: loading it could run code
        raise UnsafePickleError(f"{path}: refusing to load: the file asks for more than tensors and may execute "
                                f"code when loaded. Do not load it.") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise
        raise CheckpointMismatchError(f"{path}: not a readable PyTorch file (truncated or damaged: "
                                      f"{first_line(error).split('. ')[0]}); write or download it again") from None


def model_state(obj: Any, source: str) -> dict[str, Tensor]:
    """The state dict in a loaded file: ``obj`` itself or its ``model`` entry, ``module.`` (DDP) stripped."""
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{source}: not a state dict (nor a dict with a 'model' state dict)")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_model_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """:func:`model_state` of the file at ``path``, read once with :func:`load_tensor_file`."""
    return model_state(load_tensor_file(path), str(path))


__all__ = ["load_tensor_file", "model_state", "read_model_state"]
