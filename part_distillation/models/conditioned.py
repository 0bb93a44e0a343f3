"""Object-conditioned part classification ("gradient masking" of PartDistillation).

The stage-two class head predicts ``num_object_classes * K + 1`` logits per query: K
part classes for every object class, then one shared no-object logit (the last column).
The object class of each image is known (from its folder, or the ground truth at test
time), so only that object's K part logits and the no-object logit take part in the
loss and in the prediction. Selecting them with ``gather`` means the other columns get
exactly zero gradient, while the head's parameters are all still used (no DDP
unused-parameter issues).

Global part class of (object ``o``, local part ``k``) is ``o * K + k``.
"""
from __future__ import annotations

from typing import Mapping

import torch


def object_part_columns(object_class: torch.Tensor, parts_per_class: int) -> torch.Tensor:
    """Columns of each image's K part logits: (B,) object ids -> (B, K) global class ids."""
    parts = torch.arange(parts_per_class, device=object_class.device)
    return object_class.long()[:, None] * parts_per_class + parts[None, :]


def select_object_logits(logits: torch.Tensor, object_class: torch.Tensor, parts_per_class: int) -> torch.Tensor:
    """Keep each image's own K part logits plus the no-object logit.

    logits (B, Q, num_object_classes * K + 1), object_class (B,) -> (B, Q, K + 1), where
    column k < K is local part k and column K is no-object.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, Q, C*K+1), got shape {tuple(logits.shape)}")
    num_part_logits = logits.shape[-1] - 1
    if parts_per_class < 1 or num_part_logits % parts_per_class:
        raise ValueError(f"{logits.shape[-1]} logits are not num_object_classes * {parts_per_class} + 1")
    num_objects = num_part_logits // parts_per_class
    object_class = torch.as_tensor(object_class, device=logits.device).reshape(-1)
    if object_class.shape[0] != logits.shape[0]:
        raise ValueError(f"{object_class.shape[0]} object classes for a batch of {logits.shape[0]}")
    if object_class.numel() and (int(object_class.min()) < 0 or int(object_class.max()) >= num_objects):
        raise ValueError(f"object_class out of range [0, {num_objects})")
    no_object = torch.full((object_class.shape[0], 1), num_part_logits, dtype=torch.long, device=logits.device)
    columns = torch.cat([object_part_columns(object_class, parts_per_class), no_object], dim=1)  # (B, K+1)
    columns = columns[:, None, :].expand(-1, logits.shape[1], -1)
    return torch.gather(logits, 2, columns)


def condition_outputs(outputs: Mapping[str, object], object_class: torch.Tensor,
                      parts_per_class: int) -> dict:
    """A new outputs dict whose ``pred_logits`` (main and every aux output) are reduced
    to the image's object class with :func:`select_object_logits`; other entries are
    passed through unchanged."""
    conditioned = dict(outputs)
    conditioned["pred_logits"] = select_object_logits(outputs["pred_logits"], object_class, parts_per_class)
    if outputs.get("aux_outputs") is not None:
        conditioned["aux_outputs"] = [
            {**aux, "pred_logits": select_object_logits(aux["pred_logits"], object_class, parts_per_class)}
            for aux in outputs["aux_outputs"]
        ]
    return conditioned


def local_to_global_part(part_id: torch.Tensor, object_class: torch.Tensor, parts_per_class: int) -> torch.Tensor:
    """Global part class ``object * K + part`` of a local part id (broadcasting)."""
    return torch.as_tensor(object_class).long() * parts_per_class + torch.as_tensor(part_id).long()


def global_to_local_part(global_id: torch.Tensor, parts_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`local_to_global_part`: global class id -> (object class, local part)."""
    global_id = torch.as_tensor(global_id).long()
    return global_id // parts_per_class, global_id % parts_per_class
