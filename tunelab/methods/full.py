"""Full fine-tuning: every weight trains. A checkpoint is a whole HF model directory (model.safetensors,
or shards with an index), so it is loaded as the base model itself and must come first in --checkpoint_dir."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.methods.base import Method, MethodInfo, all_layers, as_is

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tunelab.hparams import FinetuningArguments

MODEL_WEIGHTS = "model.safetensors"  # transformers' names
MODEL_INDEX = "model.safetensors.index.json"


def prepare(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    model.requires_grad_(True)
    return model, MethodInfo("full", [], all_layers(model))


def save(model: nn.Module, out: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)


def load(model: nn.Module, ckpt: Path, is_trainable: bool) -> nn.Module:
    return model  # the checkpoint was loaded as the base model (see methods.base_model_for)


def restore(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file
    from transformers.trainer_utils import load_sharded_checkpoint

    if (ckpt / MODEL_WEIGHTS).is_file():
        model.load_state_dict(load_file(str(ckpt / MODEL_WEIGHTS)), strict=False)
    else:
        load_sharded_checkpoint(model, str(ckpt), strict=False)


METHOD = Method(
    name="full", label="full fine-tuning", help="every weight trains, a checkpoint is a whole model",
    options=(), prepare=prepare, save=save, load=load, restore=restore, merge=as_is,
    trains=True, weight_files=(MODEL_WEIGHTS, MODEL_INDEX), whole_model=True)
