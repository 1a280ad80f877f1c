"""`none`: the base model as it is, nothing trains (eval / predict of the base model, the study's base row).
Its checkpoint, if one is ever written, holds no weights, only tunelab_method.json."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.methods.base import Method, MethodInfo, as_is

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tunelab.hparams import FinetuningArguments


def prepare(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    model.requires_grad_(False)
    return model, MethodInfo("none")


def save(model: nn.Module, out: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    """Nothing trained, nothing to write."""


def load(model: nn.Module, ckpt: Path, is_trainable: bool) -> nn.Module:
    return model


def restore(model: nn.Module, ckpt: Path) -> None:
    """Nothing trained, nothing to restore."""


METHOD = Method(
    name="none", label="no fine-tuning", help="the base model as it is, for eval/predict only",
    options=(), prepare=prepare, save=save, load=load, restore=restore, merge=as_is,
    trains=False, weight_files=())
