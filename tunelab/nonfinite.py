"""Stop training at the first non-finite gradient (a NaN/inf loss, or an overflow in backward), before the
optimizer writes it into the weights — or, with `--skip_nonfinite true`, skip that optimizer step.

HF's Trainer logs such a step's loss as the mean of the earlier ones (`logging_nan_inf_filter`) and applies
the NaN update, so a diverged run used to finish with NaN weights, a plausible train_loss and exit 0. The
check runs where the Trainer hands control to callbacks between the gradient clipping and the optimizer
step; a NaN/inf loss always gives NaN/inf gradients there, so one pass over the trainable gradients (what
clipping reads anyway) covers both.

    trainer.add_callback(NonFiniteGuard(skip=args.run.skip_nonfinite))
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)


def grads_finite(model: torch.nn.Module) -> bool:
    """Whether every gradient of the model is finite (True when there is none, e.g. under DeepSpeed, whose
    engine keeps its own)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf)))


def params_finite(model: torch.nn.Module) -> bool:
    """Whether every trainable weight of the model is finite."""
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    return not params or bool(torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf)))


def last_checkpoint(output_dir: str) -> str | None:
    """The checkpoint-<step> folder with the highest step in output_dir, or None."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return str(max(found, key=lambda p: int(p.name[11:]))) if found else None


class NonFiniteGuard(TrainerCallback):
    """Raises a TunelabError naming the step (and the last checkpoint saved before it) at the first
    non-finite gradient; with `skip`, drops that step's gradients instead (the optimizer leaves every weight
    as it was) and counts the skipped steps in `skipped`."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.skipped = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or args.fp16 or grads_finite(model):  # fp16: the loss scaler skips inf steps itself
            return
        step = state.global_step + 1
        if self.skip:
            self.skipped += 1
            logger.warning("step %d: non-finite loss or gradient: step skipped (--skip_nonfinite; %d so far)",
                           step, self.skipped)
            model.zero_grad(set_to_none=True)  # optimizers leave parameters without a gradient untouched
            return
        raise _stopped(args, step, "the loss or a gradient is not finite (NaN/inf); training stopped before the "
                       "update", "; --skip_nonfinite true skips such steps")

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # finite gradients can still make an update overflow (Adam's step is ~ learning_rate in size)
        if model is not None and not args.fp16 and not params_finite(model):
            raise _stopped(args, state.global_step + 1, "the update made a weight NaN/inf", "")


def _stopped(args, step: int, what: str, hint: str) -> TunelabError:
    ckpt = last_checkpoint(args.output_dir)
    return TunelabError(f"step {step}: {what}; last checkpoint: {ckpt or 'none saved'}. Lower --learning_rate "
                        f"(now {args.learning_rate:g}){hint}")
