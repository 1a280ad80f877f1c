"""The non-finite guard (tunelab/nonfinite.py) on a bare module and optimizer: a NaN gradient stops the run
naming the step, or with skip leaves every weight as it was; an overflowing update stops it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.nonfinite import NonFiniteGuard, grads_finite, last_checkpoint, params_finite


def _model_with_grad(value: float) -> torch.nn.Linear:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = value
    return model


def _args(tmp_path, fp16: bool = False):
    return SimpleNamespace(output_dir=str(tmp_path), learning_rate=1e-3, fp16=fp16)


@pytest.mark.parametrize("value, finite", [(1.0, True), (float("nan"), False), (float("inf"), False),
                                           (3e38, True)])  # huge but finite: a 2-norm would overflow
def test_grads_finite(value, finite):
    assert grads_finite(_model_with_grad(value)) is finite


def test_a_nan_gradient_stops_naming_the_step_and_the_last_checkpoint(tmp_path):
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    with pytest.raises(TunelabError, match=f"step 13: .*last checkpoint: {tmp_path / 'checkpoint-10'}"):
        NonFiniteGuard().on_pre_optimizer_step(_args(tmp_path), SimpleNamespace(global_step=12), None,
                                               model=_model_with_grad(float("nan")))


def test_skip_drops_the_step_and_the_optimizer_leaves_the_weights(tmp_path):
    model = _model_with_grad(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    guard = NonFiniteGuard(skip=True)
    guard.on_pre_optimizer_step(_args(tmp_path), SimpleNamespace(global_step=0), None, model=model)
    torch.optim.AdamW(model.parameters(), lr=0.1).step()
    assert guard.skipped == 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_finite_steps_and_fp16_pass(tmp_path):
    guard = NonFiniteGuard()
    guard.on_pre_optimizer_step(_args(tmp_path), SimpleNamespace(global_step=0), None, model=_model_with_grad(1.0))
    # fp16: the loss scaler skips inf steps itself
    guard.on_pre_optimizer_step(_args(tmp_path, fp16=True), SimpleNamespace(global_step=0), None,
                                model=_model_with_grad(float("inf")))
    assert guard.skipped == 0


def test_an_update_that_overflows_the_weights_stops(tmp_path):
    model = torch.nn.Linear(2, 2)
    assert params_finite(model)
    with torch.no_grad():
        model.bias[0] = float("inf")
    with pytest.raises(TunelabError, match="step 5: the update made a weight NaN/inf; last checkpoint: none saved"):
        NonFiniteGuard().on_optimizer_step(_args(tmp_path), SimpleNamespace(global_step=4), None, model=model)
    assert last_checkpoint(str(tmp_path)) is None
