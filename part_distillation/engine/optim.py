"""The reference optimisation: AdamW with no weight decay on normalisation layers and
embeddings, the backbone at a tenth of the learning rate, gradient-norm clipping over the
whole model.

Parameter groups follow Mask2Former's ``build_optimizer`` (``WEIGHT_DECAY_NORM = 0``,
``WEIGHT_DECAY_EMBED = 0``, ``BACKBONE_MULTIPLIER = 0.1``): a parameter gets weight decay
0 when its module is a normalisation layer or an ``nn.Embedding``, or when its name is
Swin's relative position bias table or absolute position embedding (the only plain
``nn.Parameter`` embeddings the reference exempts). The pixel decoder's ``level_embed``,
a plain ``nn.Parameter``, keeps the decay as in the reference (the transformer decoder's
``level_embed`` is an ``nn.Embedding`` and gets none). Parameters of the backbone get
``lr_scale`` = the backbone multiplier (the trainer sets each group's lr to the schedule's
lr x ``lr_scale``); it only acts where the backbone trains (the supervised and few-shot
baselines; stages 4 and 6 freeze it). Frozen parameters (``requires_grad=False``) are left
out. Biases keep the decay (detectron2's default ``WEIGHT_DECAY_BIAS``).
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
#: (The pixel decoder's ``level_embed`` is not one of them: the reference decays it.)
EMBEDDING_NAME_PARTS = ("relative_position_bias_table", "absolute_pos_embed", "position_embedding")


def no_decay(module: nn.Module, param_name: str) -> bool:
    """Whether ``module``'s parameter ``param_name`` (full dotted name) gets no weight decay."""
    if isinstance(module, NORM_TYPES) or isinstance(module, nn.Embedding):
        return True
    return any(part in param_name for part in EMBEDDING_NAME_PARTS)


def backbone_prefix(model: nn.Module) -> str:
    """The parameter-name prefix of ``model``'s backbone: its ``backbone_prefix`` attribute
    (``models.mask2former.Mask2Former``), else detectron2's ``backbone.``."""
    return str(getattr(model, "backbone_prefix", "backbone."))


def param_groups(model: nn.Module, weight_decay: float, backbone_multiplier: float = 1.0) -> list[dict]:
    """AdamW groups ``decay`` (weight_decay) and ``no_decay`` (0), each split into the backbone
    (``backbone_decay``/``backbone_no_decay``, ``lr_scale`` = ``backbone_multiplier``) and the
    rest (``lr_scale`` 1); trainable parameters only, empty groups left out (with the backbone
    frozen: the two groups ``decay`` and ``no_decay``).

    Each group carries ``name`` and the parameter names (``param_names``) for inspection.
    """
    seen: set[int] = set()
    prefix = backbone_prefix(model)
    groups: dict[str, tuple[list, list]] = {key: ([], []) for key in
                                            ("decay", "no_decay", "backbone_decay", "backbone_no_decay")}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            key = "no_decay" if no_decay(module, full) else "decay"
            params, names = groups[f"backbone_{key}" if full.startswith(prefix) else key]
            params.append(param)
            names.append(full)
    return [{"name": key, "params": params, "param_names": names,
             "weight_decay": 0.0 if key.endswith("no_decay") else weight_decay,
             "lr_scale": backbone_multiplier if key.startswith("backbone") else 1.0}
            for key, (params, names) in groups.items() if params]


def build_adamw(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05, backbone_multiplier: float = 1.0,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (reference: lr 1e-4, weight decay 0.05, backbone x0.1);
    each group's initial lr is ``lr`` x its ``lr_scale``."""
    groups = param_groups(model, weight_decay, backbone_multiplier)
    if not groups:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm over all ``parameters`` (reference: 0.01, full model)."""
    params = [p for p in parameters if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
