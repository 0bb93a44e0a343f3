"""Object-conditioned part classification ("gradient masking" of PartDistillation).

The stage-two class head is ``Linear(D, num_object_classes * K + 1)``: K part classes for
every object class, then one shared no-object output (the last row). The object class
of each image is known (from its folder, or the ground truth at test time), so only that
object's K part logits and the no-object logit take part in the loss and in the
prediction, at every decoder layer (auxiliary outputs included) and at inference.

The K + 1 weight rows of each image's class are selected *before* the matrix product
(:func:`select_head_rows`, then :func:`conditioned_logits`), so no tensor of
``num_object_classes * K`` logits is ever made: at 22k x 8 classes the full logits of 200
queries x 10 layers cost ~1.4 GB per image. The rows are selected once per forward and
shared by all layers, so the backward adds one dense gradient of the head's size (its
``.grad``) and nothing else that grows with the number of classes. The other rows get
exactly zero gradient while every parameter is still used (no DDP unused-parameter
issues).

Global part class of (object ``o``, local part ``k``) is ``o * K + k``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F


def object_part_columns(object_class: Tensor, parts_per_class: int) -> Tensor:
    """Columns of each image's K part logits: (B,) object ids -> (B, K) global class ids."""
    parts = torch.arange(parts_per_class, device=object_class.device)
    return object_class.long()[:, None] * parts_per_class + parts[None, :]


def object_head_rows(object_class: Tensor, parts_per_class: int, num_outputs: int,
                     batch_size: int | None = None) -> Tensor:
    """Rows (outputs) of a ``num_objects * K + 1`` head used by each image: (B, K + 1) int64,
    the image's K part rows then the no-object row (the last one).

    Raises ``ValueError`` when the head size is not ``num_objects * K + 1``, an object
    class is out of range, or (with ``batch_size``) the batch size does not match.
    """
    num_part_outputs = int(num_outputs) - 1
    if parts_per_class < 1 or num_part_outputs < parts_per_class or num_part_outputs % parts_per_class:
        raise ValueError(f"a head of {num_outputs} outputs is not num_object_classes * {parts_per_class} + 1")
    num_objects = num_part_outputs // parts_per_class
    object_class = torch.as_tensor(object_class).reshape(-1)
    if batch_size is not None and object_class.shape[0] != batch_size:
        raise ValueError(f"{object_class.shape[0]} object classes for a batch of {batch_size}")
    if object_class.numel() and (int(object_class.min()) < 0 or int(object_class.max()) >= num_objects):
        raise ValueError(f"object_class out of range [0, {num_objects})")
    no_object = torch.full((object_class.shape[0], 1), num_part_outputs, dtype=torch.long,
                           device=object_class.device)
    return torch.cat([object_part_columns(object_class, parts_per_class), no_object], dim=1)


def select_head_rows(weight: Tensor, bias: Tensor | None, object_class: Tensor,
                     parts_per_class: int) -> tuple[Tensor, Tensor | None]:
    """Each image's K + 1 rows of the head: weight (O, D) -> (B, K + 1, D), bias (O,) -> (B, K + 1)."""
    rows = object_head_rows(torch.as_tensor(object_class, device=weight.device), parts_per_class, weight.shape[0])
    # embedding: its backward makes one dense head-sized gradient (indexing makes two)
    return F.embedding(rows, weight), (None if bias is None else F.embedding(rows, bias[:, None])[..., 0])


def conditioned_logits(queries: Tensor, weight_rows: Tensor, bias_rows: Tensor | None) -> Tensor:
    """Logits of selected rows: queries (B, Q, D), weight_rows (B, K+1, D), bias_rows (B, K+1)
    -> (B, Q, K + 1); column k < K is local part k, column K is no-object."""
    logits = torch.bmm(queries, weight_rows.transpose(1, 2).to(queries.dtype))
    return logits if bias_rows is None else logits + bias_rows[:, None, :].to(logits.dtype)


def conditioned_head(head: torch.nn.Linear, queries: Sequence[Tensor], object_class: Tensor,
                     parts_per_class: int) -> list[Tensor]:
    """Apply ``head`` to every layer's queries (each (B, Q, D)) for the images' object
    classes only: one (B, Q, K + 1) logits tensor per layer, rows selected once."""
    weight_rows, bias_rows = select_head_rows(head.weight, head.bias, object_class, parts_per_class)
    for q in queries:
        if q.shape[0] != weight_rows.shape[0]:
            raise ValueError(f"{weight_rows.shape[0]} object classes for a batch of {q.shape[0]}")
    return [conditioned_logits(q, weight_rows, bias_rows) for q in queries]


def select_object_logits(logits: Tensor, object_class: Tensor, parts_per_class: int) -> Tensor:
    """The same selection applied to already computed full logits (B, Q, O) -> (B, Q, K + 1).

    For logits that exist anyway (small heads, checks); a model with a large head uses
    :func:`conditioned_head` instead, which never computes them.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, Q, C*K+1), got shape {tuple(logits.shape)}")
    rows = object_head_rows(torch.as_tensor(object_class, device=logits.device), parts_per_class,
                            logits.shape[-1], batch_size=logits.shape[0])
    return torch.gather(logits, 2, rows[:, None, :].expand(-1, logits.shape[1], -1))


def local_to_global_part(part_id: Tensor, object_class: Tensor, parts_per_class: int) -> Tensor:
    """Global part class ``object * K + part`` of a local part id (broadcasting)."""
    return torch.as_tensor(object_class).long() * parts_per_class + torch.as_tensor(part_id).long()


def global_to_local_part(global_id: Tensor, parts_per_class: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`local_to_global_part`: global class id -> (object class, local part)."""
    global_id = torch.as_tensor(global_id).long()
    return global_id // parts_per_class, global_id % parts_per_class
