"""Fine-tuning methods as model-preparation steps: the only place LoRA, Freeze, P-Tuning v2, full and
`none` differ. Everything after preparation (data, loop, loss, logging, saving) is shared.

    model, info = prepare_model(model, args.finetune)        # before training
    save_trainable(model, out_dir, info)                      # what the run keeps (safetensors only)
    model, meta = load_checkpoints(model, ["runs/x"])         # for eval / chat / export / resume

Each checkpoint directory carries `tunelab_method.json` (method, resolved modules, prefix size, base model)
so loading needs no method flags.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tunelab.hparams import FinetuningArguments, TunelabError
from tunelab.model import num_layers

logger = logging.getLogger(__name__)

METHOD_FILE = "tunelab_method.json"
FREEZE_WEIGHTS = "freeze_weights.safetensors"


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


def target_leaf_names(model: nn.Module) -> list[str]:
    """Names of leaf modules that LoRA/Freeze can target (Linear, GPT-2's Conv1D, Embedding)."""
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, Conv1D, nn.Embedding)
    return [name for name, mod in model.named_modules() if name and isinstance(mod, kinds)]


def _resolve(model: nn.Module, targets: str, layers: list[int] | None, mode: str) -> list[str]:
    from tunelab.targets import format_target_table, resolve_targets

    config = model.config
    names = resolve_targets(target_leaf_names(model), config.model_type, num_layers(config), targets, layers, mode)
    logger.info("target modules:\n%s", format_target_table(names, num_layers(config)))
    return names


def _layers_of(names: list[str]) -> list[int]:
    from tunelab.targets import layer_of

    return sorted({i for i in map(layer_of, names) if i is not None})


def _layer_spec(ft: FinetuningArguments, model: nn.Module) -> list[int] | None:
    from tunelab.targets import parse_layer_spec

    return parse_layer_spec(ft.target_layers, num_layers(model.config)) if ft.target_layers else None


# ---- the methods: each takes the base model and returns (model to train, what it trains) ----

def prepare_lora(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    from peft import LoraConfig, get_peft_model

    names = _resolve(model, ft.lora_target, _layer_spec(ft, model), ft.target_match)
    config = LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                        target_modules=names, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    extra = {"lora_rank": ft.lora_rank, "lora_alpha": ft.lora_alpha, "lora_dropout": ft.lora_dropout}
    return model, MethodInfo("lora", names, _layers_of(names), extra=extra)


def prepare_freeze(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    from tunelab.targets import freeze_layers

    layers = _layer_spec(ft, model) or freeze_layers(ft.num_layer_trainable, num_layers(model.config))
    names = _resolve(model, ft.name_module_trainable, layers, "strict")
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].requires_grad_(True)
    return model, MethodInfo("freeze", names, _layers_of(names))


def prepare_p_tuning(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    from tunelab.prefix import PrefixModel

    wrapped = PrefixModel(model, pre_seq_len=ft.pre_seq_len, projection=ft.prefix_projection)
    extra = {"pre_seq_len": ft.pre_seq_len, "prefix_projection": ft.prefix_projection}
    return wrapped, MethodInfo("p_tuning", [], list(range(num_layers(model.config))), extra=extra)


def prepare_full(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    model.requires_grad_(True)
    return model, MethodInfo("full", [], list(range(num_layers(model.config))))


def prepare_none(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    model.requires_grad_(False)
    return model, MethodInfo("none")


METHODS: dict[str, Callable[[nn.Module, FinetuningArguments], tuple[nn.Module, MethodInfo]]] = {
    "lora": prepare_lora,
    "freeze": prepare_freeze,
    "p_tuning": prepare_p_tuning,
    "full": prepare_full,
    "none": prepare_none,
}


def prepare_model(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    """Apply the method of `ft.finetuning_type`; report what trains."""
    if ft.finetuning_type not in METHODS:
        raise TunelabError(f"unknown finetuning_type '{ft.finetuning_type}': valid: {', '.join(METHODS)}")
    model, info = METHODS[ft.finetuning_type](model, ft)
    info.trainable_params, info.all_params = count_params(model)
    return model, info


# ---- saving and loading what a method trained ----

def save_trainable(model: nn.Module, out_dir: str | Path, info: MethodInfo, base_model: str,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the method's weights (safetensors) and tunelab_method.json into out_dir. `state_dict`, when
    given, is the model's full gathered state (DeepSpeed ZeRO-3 / FSDP) and is used instead of the model's."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = info.finetuning_type
    if kind in ("lora", "full"):
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    elif kind == "p_tuning":
        model.save_prefix(out, state_dict=state_dict)
    elif kind == "freeze":
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        source = state_dict if state_dict is not None else dict(model.named_parameters())
        weights = {n: source[n].detach().contiguous().cpu() for n in trainable}
        save_file(weights, str(out / FREEZE_WEIGHTS), metadata={"format": "pt"})
    meta = {**info.to_dict(), "base_model": base_model}
    (out / METHOD_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def read_method(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / METHOD_FILE
    if not path.is_file():
        raise TunelabError(f"{ckpt} is not a tunelab checkpoint (no {METHOD_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def load_trainable(model: nn.Module, ckpt: str | Path, meta: dict[str, Any], is_trainable: bool = False) -> nn.Module:
    """Put one checkpoint's weights onto `model` (the base model or an already prepared one)."""
    from safetensors.torch import load_file

    kind = meta["finetuning_type"]
    if kind == "lora":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(ckpt), is_trainable=is_trainable)
    if kind == "p_tuning":
        from tunelab.prefix import load_prefix

        return load_prefix(model, ckpt)
    if kind == "freeze":
        weights = load_file(str(Path(ckpt) / FREEZE_WEIGHTS))
        missing = set(weights) - set(dict(model.named_parameters()))
        if missing:
            raise TunelabError(f"checkpoint {ckpt} does not fit this model: unknown weights {sorted(missing)[:3]}")
        model.load_state_dict(weights, strict=False)
        return model
    if kind in ("full", "none"):
        return model  # a full checkpoint is loaded as the base model itself (see base_model_for)
    raise TunelabError(f"checkpoint {ckpt} has unknown method '{kind}'")


def restore_trainable(model: nn.Module, ckpt: str | Path, meta: dict[str, Any]) -> None:
    """Load a checkpoint's trained weights into an already *prepared* model (resuming a run)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    kind = meta["finetuning_type"]
    if kind == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    elif kind == "p_tuning":
        model.load_prefix_state_dict(load_file(str(ckpt / "prefix_encoder.safetensors")))
    elif kind == "freeze":
        model.load_state_dict(load_file(str(ckpt / FREEZE_WEIGHTS)), strict=False)
    elif kind == "full":
        from transformers.trainer_utils import load_sharded_checkpoint

        if (ckpt / "model.safetensors").is_file():
            model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
        else:
            load_sharded_checkpoint(model, str(ckpt), strict=False)


def base_model_for(checkpoints: list[str]) -> str | None:
    """The model a checkpoint list sits on: a full checkpoint is itself the base; else the recorded base."""
    if not checkpoints:
        return None
    first = read_method(checkpoints[0])
    return checkpoints[0] if first["finetuning_type"] == "full" else first.get("base_model")


def load_checkpoints(model: nn.Module, checkpoints: list[str], merge: bool = True) -> tuple[nn.Module, dict]:
    """Apply checkpoints in order. LoRA adapters are merged into the weights (several merge in order)
    when `merge`; the last one stays a live adapter when not. Returns the model and the last method."""
    meta: dict[str, Any] = {"finetuning_type": "none"}
    for i, ckpt in enumerate(checkpoints):
        meta = read_method(ckpt)
        if meta["finetuning_type"] == "full" and i > 0:
            raise TunelabError(f"a full checkpoint ({ckpt}) can only come first in --checkpoint_dir")
        model = load_trainable(model, ckpt, meta)
        is_last = i == len(checkpoints) - 1
        if meta["finetuning_type"] == "lora" and (merge or not is_last):
            model = model.merge_and_unload()
    return model, meta


def split_checkpoints(checkpoint_dir: str | None) -> list[str]:
    ckpts = [c.strip() for c in (checkpoint_dir or "").split(",") if c.strip()]
    for c in ckpts:
        if not Path(c).is_dir():
            raise TunelabError(f"checkpoint directory not found: {c}")
    return ckpts


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
