"""What every method shares: the `Method` record, `MethodInfo` (what a prepared model trains), parameter
counts and the target-resolution helpers LoRA and Freeze use.

Light on purpose: torch, transformers and peft are imported inside the functions that need them, so the
registry (and with it `hparams`, whose `--finetuning_type` choices come from it) imports cheaply and
never imports `hparams` back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tunelab.errors import TunelabError
from tunelab.targets import format_target_table, layer_of, num_layers, parse_layer_spec, resolve_targets

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn

    from tunelab.hparams import FinetuningArguments

logger = logging.getLogger(__name__)


@dataclass
class MethodInfo:
    """What a prepared model trains; saved as trainable.json and tunelab_method.json."""

    finetuning_type: str
    modules: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    trainable_params: int = 0
    all_params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # method settings needed to rebuild it

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.all_params, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"finetuning_type": self.finetuning_type, "trainable_params": self.trainable_params,
                "all_params": self.all_params, "trainable_percent": round(self.trainable_percent, 6),
                "layers": self.layers, "modules": self.modules, **self.extra}

    def summary(self) -> str:
        return (f"trainable params: {self.trainable_params:,} || all params: {self.all_params:,} || "
                f"trainable%: {self.trainable_percent:.4f}")


Prepare = Callable[["nn.Module", "FinetuningArguments"], "tuple[nn.Module, MethodInfo]"]
Save = Callable[["nn.Module", Path, "dict[str, torch.Tensor] | None"], None]
Load = Callable[["nn.Module", Path, bool], "nn.Module"]
Restore = Callable[["nn.Module", Path], None]
Merge = Callable[["nn.Module"], "nn.Module"]
Fits = Callable[[Path, Any, "Mapping[str, tuple[int, ...]] | None"], "str | None"]


@dataclass(frozen=True)
class Method:
    """One fine-tuning method, whole: the registry (tunelab/methods/__init__.py) holds one per name.

    prepare(model, ft) -> (model to train, MethodInfo without counts)   before training
    save(model, out_dir, state_dict)       write the trained weights (safetensors); `state_dict`, when not
                                           None, is the gathered full state (ZeRO-3 / FSDP) to save from
    load(model, ckpt_dir, is_trainable)    put a checkpoint's weights onto a base model; returns the model
    restore(model, ckpt_dir)               load a checkpoint's weights into an already prepared model (resume)
    merge(model) -> model                  fold loaded weights into plain weights (eval, export); None: they
                                           cannot be (export refuses the checkpoint)
    fits(ckpt_dir, config, shapes)         why the checkpoint's saved tensors do not fit a model of `config`
                                           whose parameter shapes are `shapes` ({name: shape}, None when
                                           unknown), read from metadata only (methods/fit.py); None: they fit
    """

    name: str  # the --finetuning_type value, recorded in tunelab_method.json
    label: str  # what people call it, for messages ("P-Tuning v2")
    help: str  # one line for --help
    options: tuple[str, ...]  # the FinetuningArguments fields `prepare` reads
    prepare: Prepare
    save: Save
    load: Load
    restore: Restore
    merge: Merge | None
    trains: bool  # False only for `none`: the base model as it is
    weight_files: tuple[str, ...]  # a checkpoint of a method that trains holds at least one of these
    whole_model: bool = False  # a checkpoint is a whole model directory, loaded as the base itself
    fits: Fits | None = None  # None: nothing to check beyond the recorded base shape

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise TunelabError(f"method name '{self.name}' must be a plain identifier (it is a flag value)")
        if self.trains != bool(self.weight_files):
            raise TunelabError(f"method '{self.name}': a method that trains names the weight files its checkpoints "
                               f"hold (weight_files), and only such a method does")


def as_is(model: nn.Module) -> nn.Module:
    """`merge` of methods whose loaded weights already are plain weights (Freeze, full, none)."""
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ---- target helpers for the methods that train chosen modules (LoRA, Freeze) ----

def target_leaf_names(model: nn.Module) -> list[str]:
    """Names of leaf modules that LoRA/Freeze can target (Linear, GPT-2's Conv1D, Embedding)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, Conv1D, nn.Embedding)
    return [name for name, mod in model.named_modules() if name and isinstance(mod, kinds)]


def resolve_modules(model: nn.Module, targets: str, layers: list[int] | None, mode: str) -> list[str]:
    """Module names of `model` that the target list and layer list select (logged as a table)."""
    config = model.config
    names = resolve_targets(target_leaf_names(model), config.model_type, num_layers(config), targets, layers, mode)
    logger.info("target modules:\n%s", format_target_table(names, num_layers(config)))
    return names


def layers_of(names: list[str]) -> list[int]:
    return sorted({i for i in map(layer_of, names) if i is not None})


def layer_spec(ft: FinetuningArguments, model: nn.Module) -> list[int] | None:
    """The layers --target_layers names, None when it is not given."""
    return parse_layer_spec(ft.target_layers, num_layers(model.config)) if ft.target_layers else None


def all_layers(model: nn.Module) -> list[int]:
    return list(range(num_layers(model.config)))
