"""The reference optimisation: AdamW with no weight decay on normalisation layers and
embeddings, gradient-norm clipping over the whole model.

Parameter groups follow detectron2's ``get_default_optimizer_params`` as Mask2Former
configures it (``WEIGHT_DECAY_NORM = 0``, ``WEIGHT_DECAY_EMBED = 0``): a parameter gets
weight decay 0 when its module is a normalisation layer or an ``nn.Embedding``, or when
its name marks a learned position/level embedding (Swin's relative position bias table,
the pixel decoder's ``level_embed``). Frozen parameters (``requires_grad=False``) are
left out. Biases keep the decay (detectron2's default ``WEIGHT_DECAY_BIAS``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)
#: Parameter-name fragments of learned embeddings that are plain ``nn.Parameter``s.
EMBEDDING_NAME_PARTS = ("relative_position_bias_table", "absolute_pos_embed", "position_embedding",
                        "level_embed", "query_embed", "queries_embedder", "queries_features")


def no_decay(module: nn.Module, param_name: str) -> bool:
    """Whether ``module``'s parameter ``param_name`` (full dotted name) gets no weight decay."""
    if isinstance(module, NORM_TYPES) or isinstance(module, nn.Embedding):
        return True
    return any(part in param_name for part in EMBEDDING_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (weight_decay) and ``no_decay`` (0); trainable parameters only.

    Each group carries ``name`` and the parameter names (``param_names``) for inspection.
    """
    seen: set[int] = set()
    groups = {"decay": ([], []), "no_decay": ([], [])}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            params, names = groups["no_decay" if no_decay(module, full) else "decay"]
            params.append(param)
            names.append(full)
    return [{"name": key, "params": params, "param_names": names,
             "weight_decay": weight_decay if key == "decay" else 0.0}
            for key, (params, names) in groups.items() if params]


def build_adamw(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (reference: lr 1e-4, weight decay 0.05)."""
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm over all ``parameters`` (reference: 0.01, full model)."""
    params = [p for p in parameters if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
