"""Tests of the object-conditioned part head (PartDistillation gradient masking)."""
from __future__ import annotations

import pytest
import torch

from part_distillation.models.conditioned import (
    condition_outputs,
    global_to_local_part,
    local_to_global_part,
    object_part_columns,
    select_object_logits,
)
from part_distillation.models.criterion import HungarianMatcher, SetCriterion

torch.set_num_threads(2)

NUM_OBJECTS, K, Q = 5, 3, 4
NUM_LOGITS = NUM_OBJECTS * K + 1


def test_select_picks_exactly_the_object_columns_and_no_object():
    logits = torch.arange(2 * Q * NUM_LOGITS, dtype=torch.float32).reshape(2, Q, NUM_LOGITS)
    objects = torch.tensor([3, 0])
    selected = select_object_logits(logits, objects, K)
    assert selected.shape == (2, Q, K + 1)
    assert torch.equal(selected[0, :, :K], logits[0, :, 9:12])
    assert torch.equal(selected[1, :, :K], logits[1, :, 0:3])
    assert torch.equal(selected[:, :, K], logits[:, :, -1])
    assert object_part_columns(objects, K).tolist() == [[9, 10, 11], [0, 1, 2]]


def test_gradient_reaches_only_selected_columns():
    logits = torch.randn(3, Q, NUM_LOGITS, requires_grad=True)
    objects = torch.tensor([1, 4, 1])
    selected = select_object_logits(logits, objects, K)
    (selected * torch.randn_like(selected)).sum().backward()
    allowed = torch.zeros(3, NUM_LOGITS, dtype=torch.bool)
    for b, o in enumerate(objects.tolist()):
        allowed[b, o * K:(o + 1) * K] = True
        allowed[b, -1] = True
    grad = logits.grad
    assert (grad.abs().sum(1)[allowed] > 0).all()
    assert (grad.permute(0, 2, 1)[~allowed] == 0).all()


def test_gradient_masking_through_a_linear_head_and_the_criterion():
    """End to end: head -> conditioned outputs -> set loss. Part rows of the head's
    weight for objects not in the batch get exactly zero gradient."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, NUM_LOGITS)
    queries = torch.randn(2, Q, 8)
    objects = torch.tensor([2, 2])
    outputs = {"pred_logits": head(queries), "pred_masks": torch.randn(2, Q, 4, 4, requires_grad=True),
               "aux_outputs": [{"pred_logits": head(queries * 0.5), "pred_masks": torch.randn(2, Q, 4, 4)}]}
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 16, 16) > 0.5},
               {"labels": torch.tensor([1]), "masks": torch.rand(1, 16, 16) > 0.5}]
    criterion = SetCriterion(K, HungarianMatcher(num_points=64), num_points=64)
    losses = criterion(condition_outputs(outputs, objects, K), targets)
    assert len(losses) == 6
    SetCriterion.total_loss(losses).backward()
    row_grad = head.weight.grad.abs().sum(1)
    used = torch.zeros(NUM_LOGITS, dtype=torch.bool)
    used[2 * K:3 * K] = True
    used[-1] = True
    assert (row_grad[used] > 0).all()
    assert (row_grad[~used] == 0).all()
    assert (head.bias.grad[~used] == 0).all()


def test_condition_outputs_covers_aux_and_keeps_other_entries():
    logits = torch.randn(2, Q, NUM_LOGITS)
    masks = torch.randn(2, Q, 4, 4)
    outputs = {"pred_logits": logits, "pred_masks": masks, "query_embeddings": torch.randn(2, Q, 8),
               "aux_outputs": [{"pred_logits": logits + i, "pred_masks": masks} for i in range(3)]}
    objects = torch.tensor([0, 4])
    new = condition_outputs(outputs, objects, K)
    assert new["pred_logits"].shape == (2, Q, K + 1)
    assert new["pred_masks"] is masks and new["query_embeddings"] is outputs["query_embeddings"]
    assert len(new["aux_outputs"]) == 3
    for i, aux in enumerate(new["aux_outputs"]):
        assert torch.equal(aux["pred_logits"], select_object_logits(logits + i, objects, K))
        assert aux["pred_masks"] is masks
    # the input is not modified
    assert outputs["pred_logits"].shape[-1] == NUM_LOGITS
    assert outputs["aux_outputs"][0]["pred_logits"].shape[-1] == NUM_LOGITS
    assert "aux_outputs" not in condition_outputs({"pred_logits": logits, "pred_masks": masks}, objects, K)


def test_invalid_inputs_are_rejected():
    logits = torch.randn(2, Q, NUM_LOGITS)
    with pytest.raises(ValueError):
        select_object_logits(logits, torch.tensor([0, 1]), 4)  # 16 logits are not C*4+1
    with pytest.raises(ValueError):
        select_object_logits(logits, torch.tensor([0, NUM_OBJECTS]), K)
    with pytest.raises(ValueError):
        select_object_logits(logits, torch.tensor([0]), K)
    with pytest.raises(ValueError):
        select_object_logits(logits[0], torch.tensor([0]), K)


def test_local_and_global_part_ids_round_trip():
    parts = torch.tensor([0, 2, 1, 0])
    objects = torch.tensor([0, 0, 4, 3])
    global_ids = local_to_global_part(parts, objects, K)
    assert global_ids.tolist() == [0, 2, 13, 9]
    back_objects, back_parts = global_to_local_part(global_ids, K)
    assert torch.equal(back_objects, objects) and torch.equal(back_parts, parts)
    # broadcasting: one object, many predicted parts
    assert local_to_global_part(torch.arange(K), torch.tensor(2), K).tolist() == [6, 7, 8]
    # a prediction argmax over the conditioned logits maps back to the full head's column
    logits = torch.randn(1, Q, NUM_LOGITS)
    local = select_object_logits(logits, torch.tensor([3]), K)[..., :K].argmax(-1)
    global_pred = local_to_global_part(local, torch.tensor([3])[:, None], K)
    assert torch.equal(global_pred, logits[..., 3 * K:4 * K].argmax(-1) + 3 * K)
