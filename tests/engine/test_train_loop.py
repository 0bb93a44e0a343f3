import gc
import weakref
from unittest import mock

import pytest
import torch
from torch import nn

from part_distillation.engine import HookBase, MultiStepSchedule, Trainer, build_adamw

from . import toy


def _trainer(max_iter=3, accum=1, per_device=4, global_batch=None, seed=0, clip_norm=0.01):
    torch.manual_seed(0)
    model = toy.make_model(seed)
    model.eval()  # no dropout: compare gradients exactly
    global_batch = global_batch or per_device * accum
    return Trainer(model, build_adamw(model, lr=1e-2), toy.data_factory(seed, global_batch, per_device),
                   _deterministic_loss, MultiStepSchedule(1e-2, steps=(2,)), max_iter=max_iter,
                   accum=accum, global_batch=global_batch, clip_norm=clip_norm)


def _deterministic_loss(model, batch):
    x, y = batch
    model.eval()
    return {"loss_mse": ((model(x) - y) ** 2).mean()}


def test_hook_call_order():
    calls = mock.Mock()
    hooks = []
    for name in ("a", "b"):
        hook = HookBase()
        for method in ("before_train", "after_train", "before_step", "after_backward", "after_step"):
            setattr(hook, method, getattr(getattr(calls, name), method))
        hooks.append(hook)
    trainer = _trainer(max_iter=2)
    trainer.register_hooks(hooks)
    trainer.train()
    step = [mock.call.a.before_step(), mock.call.b.before_step(), mock.call.a.after_backward(),
            mock.call.b.after_backward(), mock.call.a.after_step(), mock.call.b.after_step()]
    assert calls.mock_calls == ([mock.call.a.before_train(), mock.call.b.before_train()] + step + step
                                + [mock.call.a.after_train(), mock.call.b.after_train()])


def test_after_train_runs_when_a_step_fails_and_hooks_see_the_iteration():
    seen = []

    class Boom(HookBase):
        def after_step(self):
            seen.append(self.trainer.iter)
            if self.trainer.iter == 1:
                raise RuntimeError("boom")

        def after_train(self):
            seen.append("after_train")

    trainer = _trainer(max_iter=5)
    trainer.register_hooks([Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert seen == [0, 1, "after_train"]


def test_hooks_hold_a_weak_reference():
    hook = HookBase()
    trainer = _trainer()
    trainer.register_hooks([hook])
    ref = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert ref() is None
    with pytest.raises(ReferenceError):
        hook.trainer.iter


def test_hook_state_is_saved_with_the_trainer():
    class Counter(HookBase):
        def __init__(self):
            self.count = 0

        def after_step(self):
            self.count += 1

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = state["count"]

    first = _trainer(max_iter=3)
    first.register_hooks([Counter(), Counter()])
    first.train()
    state = first.state_dict()
    assert state["hooks"] == {"Counter": {"count": 3}, "Counter_2": {"count": 3}}
    assert state["iteration"] == 3
    second = _trainer(max_iter=3)
    second.register_hooks([Counter(), Counter()])
    second.load_state_dict(state)
    assert [h.count for h in second.hooks] == [3, 3] and second.iter == 3


def test_lr_follows_the_schedule_each_step():
    lrs = []

    class LR(HookBase):
        def after_step(self):
            lrs.append(self.trainer.optimizer.param_groups[0]["lr"])

    trainer = _trainer(max_iter=4)
    trainer.register_hooks([LR()])
    trainer.train()
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])


def test_accumulation_equals_a_bigger_batch():
    """4 micro-batches of 2 give the parameters of 1 batch of 8 (same samples, same order)."""
    big = _trainer(max_iter=4, accum=1, per_device=8)
    small = _trainer(max_iter=4, accum=4, per_device=2)
    big.train()
    small.train()
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert big.metrics["loss_mse"] == pytest.approx(small.metrics["loss_mse"], rel=1e-5)
    # and it is not trivially equal: an iteration of 2 samples only gives other parameters
    other = _trainer(max_iter=4, accum=1, per_device=2)
    other.train()
    assert not torch.allclose(next(other.model.parameters()), next(big.model.parameters()), atol=1e-4)


def test_non_finite_loss_is_refused():
    trainer = _trainer(max_iter=1)
    trainer.loss_fn = lambda model, batch: {"loss": torch.tensor(float("nan"), requires_grad=True)}
    with pytest.raises(FloatingPointError, match="iteration 0"):
        trainer.train()
