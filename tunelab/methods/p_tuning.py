"""P-Tuning v2: trained key/value prefixes at every layer (tunelab/prefix.py's PrefixModel wraps the base
model). Saved as prefix_encoder.safetensors + prefix_config.json. It cannot be merged into the weights:
the prefix is extra attention keys/values, not a change of any weight, so export refuses it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.methods.base import Method, MethodInfo, all_layers
from tunelab.names import PREFIX_WEIGHTS  # prefix.py (torch) loads when the method is used, not with the registry

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn

    from tunelab.hparams import FinetuningArguments


def prepare(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    from tunelab.prefix import PrefixModel

    wrapped = PrefixModel(model, pre_seq_len=ft.pre_seq_len, projection=ft.prefix_projection)
    extra = {"pre_seq_len": ft.pre_seq_len, "prefix_projection": ft.prefix_projection}
    return wrapped, MethodInfo("p_tuning", [], all_layers(model), extra=extra)


def save(model: nn.Module, out: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    model.save_prefix(out, state_dict=state_dict)


def load(model: nn.Module, ckpt: Path, is_trainable: bool) -> nn.Module:
    from tunelab.prefix import load_prefix

    return load_prefix(model, ckpt)


def restore(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file

    model.load_prefix_state_dict(load_file(str(ckpt / PREFIX_WEIGHTS)))


def fits(ckpt: Path, config, shapes: Mapping[str, tuple[int, ...]] | None) -> str | None:
    """The prefix holds a key and a value per layer of the model's key/value width (prefix_config.json)."""
    from tunelab.methods.fit import read_json
    from tunelab.prefix import PREFIX_CONFIG, kv_shape

    saved = read_json(ckpt / PREFIX_CONFIG)
    layers, kv_heads, head_dim = kv_shape(config)
    if (saved.get("num_layers"), saved.get("kv_dim")) != (layers, kv_heads * head_dim):
        return (f"its prefix is for {saved.get('num_layers')} layers x kv width {saved.get('kv_dim')}, the model has "
                f"{layers} x {kv_heads * head_dim}")
    return None


METHOD = Method(
    name="p_tuning", label="P-Tuning v2", help="P-Tuning v2, --pre_seq_len trained key/value prefixes per layer",
    options=("pre_seq_len", "prefix_projection"),
    prepare=prepare, save=save, load=load, restore=restore, merge=None,
    trains=True, weight_files=(PREFIX_WEIGHTS,), fits=fits)
