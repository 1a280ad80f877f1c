"""LoRA (peft): low-rank adapters on the chosen linear layers. Saved as a peft adapter directory
(adapter_model.safetensors + adapter_config.json, whose base_model_name_or_path is the base's Hub id when
known, e.g. HuggingFaceTB/SmolLM2-135M-Instruct for the default model); merged into the weights for eval
and export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import TunelabError
from tunelab.methods.base import Method, MethodInfo, layer_spec, layers_of, resolve_modules

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn

    from tunelab.hparams import FinetuningArguments

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name


def prepare(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    from peft import LoraConfig, get_peft_model

    from tunelab.paths import hub_id

    names = resolve_modules(model, ft.lora_target, layer_spec(ft, model), ft.target_match)
    from transformers.pytorch_utils import Conv1D

    # GPT-2's Conv1D stores its weight transposed: saying so spares peft's warning that it corrects the flag
    fan_in_fan_out = all(isinstance(model.get_submodule(n), Conv1D) for n in names)
    base_id = hub_id(getattr(model, "name_or_path", None))
    try:
        config = LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                            target_modules=names, task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out)
        model = get_peft_model(model, config)
    except ValueError as err:  # peft refuses a setting tunelab's own checks let through (a module type, ...)
        raise TunelabError(f"peft refused the LoRA set-up (--lora_target {ft.lora_target}, {len(names)} modules, "
                           f"--lora_rank {ft.lora_rank}, --lora_alpha {ft.lora_alpha}, --lora_dropout "
                           f"{ft.lora_dropout}): {_one_line(err)}") from err
    if base_id:  # adapter_config.json names the Hub base, so PeftModel.from_pretrained works on any machine
        # that has it; tunelab finds its local base through tunelab_method.json's base_model
        model.peft_config["default"].base_model_name_or_path = base_id
    extra = {"lora_rank": ft.lora_rank, "lora_alpha": ft.lora_alpha, "lora_dropout": ft.lora_dropout}
    return model, MethodInfo("lora", names, layers_of(names), extra=extra)


def save(model: nn.Module, out: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    # save_embedding_layers=False: tunelab never resizes the vocabulary, and peft's "auto" would look the base
    # (a Hub id, see prepare) up on the network to compare vocabulary sizes
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True, save_embedding_layers=False)


def load(model: nn.Module, ckpt: Path, is_trainable: bool) -> nn.Module:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(ckpt), is_trainable=is_trainable)
    except (ValueError, KeyError, TypeError) as err:  # what peft raises for a damaged adapter_config.json:
        # malformed JSON, an unknown peft_type (KeyError), a value of the wrong type (TypeError)
        raise TunelabError(f"checkpoint {ckpt}: peft cannot load its LoRA adapter (adapter_config.json: "
                           f"{type(err).__name__}: {_one_line(err)}); TUNELAB_DEBUG=1 shows where") from err


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def restore(model: nn.Module, ckpt: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ckpt / ADAPTER_WEIGHTS)))


def merge(model: nn.Module) -> nn.Module:
    return model.merge_and_unload()


def fits(ckpt: Path, config, shapes: Mapping[str, tuple[int, ...]] | None) -> str | None:
    """Each adapted module exists and its factors' update, B (out x r) @ A (r x in), has the shape of the
    module's weight (either orientation: GPT-2's Conv1D stores it transposed, an embedding's update is too)."""
    from tunelab.methods.fit import tensor_shapes

    if shapes is None:
        return None
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in tensor_shapes(ckpt / ADAPTER_WEIGHTS).items():
        module, sep, part = key.removeprefix("base_model.model.").partition(".lora_")
        factor = part.removeprefix("embedding_").split(".")[0]  # lora_A.weight, lora_embedding_A, ...
        if sep and factor in ("A", "B"):
            factors.setdefault(module, {})[factor] = shape
    for module, ab in factors.items():
        weight = shapes.get(f"{module}.weight")
        if weight is None:
            return f"it adapts {module}, which this model does not have"
        if len(ab) == 2 and len(weight) == 2 and (ab["B"][0], ab["A"][-1]) not in (weight, weight[::-1]):
            return (f"its LoRA update of {module} is {ab['B'][0]}x{ab['A'][-1]}, the model's weight is "
                    f"{weight[0]}x{weight[1]}")
    return None


METHOD = Method(
    name="lora", label="LoRA", help="peft low-rank adapters on the --lora_target modules",
    options=("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "target_layers", "target_match"),
    prepare=prepare, save=save, load=load, restore=restore, merge=merge,
    trains=True, weight_files=(ADAPTER_WEIGHTS,), fits=fits)
