"""Tests of the object-conditioned part head (PartDistillation gradient masking)."""
from __future__ import annotations

import pytest
import torch

from part_distillation.models.conditioned import (
    conditioned_head,
    global_to_local_part,
    local_to_global_part,
    object_head_rows,
    object_part_columns,
    select_object_logits,
)
from part_distillation.models.criterion import HungarianMatcher, SetCriterion
from part_distillation.models.mask2former import TINY_FIXTURE, build_mask2former
from tests.memory import PeakTensorMemory

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


def test_conditioned_head_equals_selecting_the_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, NUM_LOGITS)
    layers = [torch.randn(3, Q, 8) for _ in range(4)]
    objects = torch.tensor([4, 0, 2])
    got = conditioned_head(head, layers, objects, K)
    assert len(got) == 4
    for queries, logits in zip(layers, got):
        assert logits.shape == (3, Q, K + 1)
        full = queries @ head.weight.T + head.bias  # computed independently of the module
        torch.testing.assert_close(logits, select_object_logits(full, objects, K), rtol=1e-6, atol=1e-6)
    rows = object_head_rows(objects, K, NUM_LOGITS)
    assert rows.tolist() == [[12, 13, 14, 15], [0, 1, 2, 15], [6, 7, 8, 15]]
    with pytest.raises(ValueError, match="batch of 2"):
        conditioned_head(head, [torch.randn(2, Q, 8)], objects, K)


# ------------------------------------------------------------ in the Mask2Former model

def _conditioned_model(num_objects, parts=K):
    torch.manual_seed(0)
    return build_mask2former(TINY_FIXTURE, num_classes=num_objects * parts, parts_per_class=parts)


def test_model_conditions_every_decoder_layer_and_inference():
    model = _conditioned_model(NUM_OBJECTS).eval()
    x = torch.randn(2, 3, 64, 64)
    objects = torch.tensor([3, 1])
    with torch.no_grad():
        out = model(x, object_class=objects)
        model.parts_per_class = None  # the same weights as a plain head: all logits
        full = model(x)
        model.parts_per_class = K
    layers = [(out["pred_logits"], full["pred_logits"])]
    layers += [(a["pred_logits"], f["pred_logits"]) for a, f in zip(out["aux_outputs"], full["aux_outputs"])]
    assert len(layers) == TINY_FIXTURE.decoder_layers + 1
    for conditioned, plain in layers:
        assert conditioned.shape == (2, TINY_FIXTURE.num_queries, K + 1)
        assert plain.shape[-1] == NUM_LOGITS
        torch.testing.assert_close(conditioned, select_object_logits(plain, objects, K), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pred_masks"], full["pred_masks"])
    with pytest.raises(ValueError, match="pass object_class"):
        model(x)
    with pytest.raises(ValueError, match="not object-conditioned"):
        build_mask2former(TINY_FIXTURE, num_classes=3)(x, object_class=objects)
    with pytest.raises(ValueError, match="not a multiple"):
        build_mask2former(TINY_FIXTURE, num_classes=7, parts_per_class=K)
    with pytest.raises(ValueError, match="out of range"):
        model(x, object_class=torch.tensor([0, NUM_OBJECTS]))


def _forward_backward(model, objects, size=64):
    """One training step's forward + set loss + backward; targets of local part classes."""
    x = torch.randn(len(objects), 3, size, size)
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, :size // 2] = True
    masks[1, size // 2:] = True
    targets = [{"labels": torch.tensor([0, 1]), "masks": masks} for _ in objects]
    criterion = SetCriterion(model_parts(model), HungarianMatcher(num_points=256), num_points=256)
    out = model(x, object_class=objects)
    SetCriterion.total_loss(criterion(out, targets)).backward()


def model_parts(model):
    return getattr(model, "parts_per_class", None) or getattr(model, "parts", None)


def _step_peak(num_objects, full_logits=False):
    """Peak bytes of the tensors a forward/backward step creates (tests/memory.py)."""
    model = _conditioned_model(num_objects, parts=8).train()
    objects = torch.tensor([num_objects - 1])
    if full_logits:  # the old way: all logits at every layer, then selected
        def forward(x, object_class):
            model.parts_per_class = None
            out = model(x)
            model.parts_per_class = 8
            out["pred_logits"] = select_object_logits(out["pred_logits"], object_class, 8)
            for aux in out["aux_outputs"]:
                aux["pred_logits"] = select_object_logits(aux["pred_logits"], object_class, 8)
            return out
        forward.parts = 8
    else:
        forward = model
    torch.manual_seed(1)
    with PeakTensorMemory() as memory:
        _forward_backward(forward, objects)
    head = model.class_predictor
    return memory.peak, (head.weight.numel() + head.bias.numel()) * head.weight.element_size()


def test_gradient_reaches_only_the_rows_of_the_batch_objects():
    model = _conditioned_model(NUM_OBJECTS).train()
    _forward_backward(model, torch.tensor([2, 2]))
    row_grad = model.class_predictor.weight.grad.abs().sum(1)
    used = torch.zeros(NUM_LOGITS, dtype=torch.bool)
    used[2 * K:3 * K] = True
    used[-1] = True
    assert (row_grad[used] > 0).all()
    assert (row_grad[~used] == 0).all()
    assert (model.class_predictor.bias.grad[~used] == 0).all()


def test_memory_beyond_the_head_gradient_does_not_grow_with_the_object_classes():
    small, small_head = _step_peak(10)
    large, large_head = _step_peak(22_000)
    # the step's peak grows by the head's gradient (its .grad) and nothing else
    growth_beyond_gradient = (large - large_head) - (small - small_head)
    assert abs(growth_beyond_gradient) < 100_000, (small, large, large_head)
    # the measurement sees logits: computing all of them first grows by several head sizes
    old, _ = _step_peak(22_000, full_logits=True)
    assert old - large > 2 * large_head


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
