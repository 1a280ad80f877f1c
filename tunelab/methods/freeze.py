"""Freeze: train only the chosen modules of a few layers, everything else frozen. Saves just those
weights (freeze_weights.safetensors); loading puts them back onto the base model as plain weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import TunelabError
from tunelab.methods.base import Method, MethodInfo, as_is, layer_spec, layers_of, resolve_modules
from tunelab.targets import freeze_layers, num_layers

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn

    from tunelab.hparams import FinetuningArguments

FREEZE_WEIGHTS = "freeze_weights.safetensors"


def prepare(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    layers = layer_spec(ft, model) or freeze_layers(ft.num_layer_trainable, num_layers(model.config))
    names = resolve_modules(model, ft.name_module_trainable, layers, "strict")
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].requires_grad_(True)
    return model, MethodInfo("freeze", names, layers_of(names))


def save(model: nn.Module, out: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    from safetensors.torch import save_file

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    weights = {n: source[n].detach().contiguous().cpu() for n in trainable}
    save_file(weights, str(out / FREEZE_WEIGHTS), metadata={"format": "pt"})


def load(model: nn.Module, ckpt: Path, is_trainable: bool) -> nn.Module:
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / FREEZE_WEIGHTS))
    missing = set(weights) - set(dict(model.named_parameters()))
    if missing:
        raise TunelabError(f"checkpoint {ckpt} does not fit this model: unknown weights {sorted(missing)[:3]}")
    model.load_state_dict(weights, strict=False)
    return model


def restore(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(ckpt / FREEZE_WEIGHTS)), strict=False)


def fits(ckpt: Path, config, shapes: Mapping[str, tuple[int, ...]] | None) -> str | None:
    """Every saved weight is a parameter of the model, of the same shape."""
    from tunelab.methods.fit import tensor_shapes

    if shapes is None:
        return None
    for name, shape in tensor_shapes(ckpt / FREEZE_WEIGHTS).items():
        if name not in shapes:
            return f"it holds {name}, which this model does not have"
        if shapes[name] != shape:
            return f"{name} is {list(shape)} there, {list(shapes[name])} here"
    return None


METHOD = Method(
    name="freeze", label="Freeze",
    help="train the --name_module_trainable modules of --num_layer_trainable layers",
    options=("num_layer_trainable", "name_module_trainable", "target_layers"),
    prepare=prepare, save=save, load=load, restore=restore, merge=as_is,
    trains=True, weight_files=(FREEZE_WEIGHTS,), fits=fits)
