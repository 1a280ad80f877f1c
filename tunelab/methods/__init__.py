"""Fine-tuning methods as model-preparation steps: the only place LoRA, Freeze, P-Tuning v2, full and
`none` differ. Everything after preparation (data, loop, loss, logging, saving) is shared.

    model, info = prepare_model(model, args.finetune)        # before training
    save_trainable(model, out_dir, info, base_model)          # what the run keeps (safetensors only)
    model, meta = load_checkpoints(model, ["runs/x"])         # for eval / chat / export / resume

Each method is one `Method` record (base.py) in one module of this package (lora.py, freeze.py, ...):
its name, help, the options it reads, and its prepare / save / load / restore / merge functions. REGISTRY
below is the table of them; `--finetuning_type`'s choices, the study's method labels and the tests'
method lists all come from it. To add a method: write tunelab/methods/<name>.py ending in
`METHOD = Method(...)`, add it to `_BUILTIN`, and give it its test rows (tests/test_methods.py runs every
registered method through prepare -> save -> load -> restore). `register_method` adds one at run time.

Each checkpoint directory carries `tunelab_method.json` (method, resolved modules, prefix size, base model and
its shape, the weight files' sizes) so loading needs no method flags; methods/fit.py checks from it, and from
the weight files' headers, that a checkpoint fits the model it is about to be loaded onto.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tunelab import integrity
from tunelab.errors import TunelabError
from tunelab.methods import freeze, full, lora, none, p_tuning
from tunelab.methods.base import Method, MethodInfo, count_params
from tunelab.paths import apply_umask

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tunelab.hparams import FinetuningArguments

__all__ = ["METHOD_FILE", "REGISTRY", "Method", "MethodInfo", "base_model_for", "continue_checkpoint", "count_params",
           "get_method", "load_checkpoints", "load_trainable", "method_names", "model_to_load", "prepare_model",
           "read_method", "register_method", "restore_trainable", "save_trainable", "split_checkpoints"]

METHOD_FILE = "tunelab_method.json"

_BUILTIN = (lora.METHOD, freeze.METHOD, p_tuning.METHOD, full.METHOD, none.METHOD)  # --help lists them in this order
REGISTRY: dict[str, Method] = {m.name: m for m in _BUILTIN}


def register_method(method: Method, registry: dict[str, Method] | None = None) -> Method:
    """Add `method` to `registry` (default: REGISTRY); a name can be registered once."""
    registry = REGISTRY if registry is None else registry
    if method.name in registry:
        raise TunelabError(f"method '{method.name}' is already registered")
    registry[method.name] = method
    return method


def get_method(name: str, where: str = "") -> Method:
    """The registered method called `name`; an unknown name fails naming the valid ones."""
    if name not in REGISTRY:
        raise TunelabError(f"unknown finetuning_type '{name}'{where}: valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def method_names(keep: Callable[[Method], bool] | None = None) -> tuple[str, ...]:
    """Registered method names in registry order, optionally only those `keep` accepts
    (`method_names(lambda m: m.trains)`: the methods a study row may use)."""
    return tuple(name for name, method in REGISTRY.items() if keep is None or keep(method))


def prepare_model(model: nn.Module, ft: FinetuningArguments) -> tuple[nn.Module, MethodInfo]:
    """Apply the method of `ft.finetuning_type`; report what trains."""
    method = get_method(ft.finetuning_type)
    model, info = method.prepare(model, ft)
    info.finetuning_type = method.name  # what the checkpoint records, so loading finds this same record
    info.trainable_params, info.all_params = count_params(model)
    return model, info


# ---- saving and loading what a method trained ----

def save_trainable(model: nn.Module, out_dir: str | Path, info: MethodInfo, base_model: str,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the method's weights (safetensors) and tunelab_method.json into out_dir. `state_dict`, when
    given, is the model's full gathered state (DeepSpeed ZeRO-3 / FSDP) and is used instead of the model's."""
    method = get_method(info.finetuning_type)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method.save(model, out, state_dict)
    if method.trains and not any((out / name).is_file() for name in method.weight_files):
        raise TunelabError(f"method '{method.name}' saved no weights into {out} "
                           f"(expected one of {', '.join(method.weight_files)})")
    # written last, through a temp file, with the sizes of the weight files: a truncated one is refused
    meta = {**info.to_dict(), "base_model": base_model, "base_shape": _shape_of(model),
            "files": integrity.file_sizes(out, _weight_files(out, method))}
    integrity.write_json(out / METHOD_FILE, meta)
    apply_umask(out, recursive=False)  # safetensors writes 0600 files


def _shape_of(model: nn.Module) -> dict[str, Any] | None:
    """The base's shape (methods/fit.py): what loading the checkpoint onto another model is checked against."""
    from tunelab.methods.fit import base_shape

    config = getattr(model, "config", None)
    return base_shape(config) if config is not None else None


def _weight_files(out: Path, method: Method) -> list[str]:
    """The method's weight files in out, with the shards a *.index.json among them names."""
    names = list(method.weight_files)
    for name in method.weight_files:
        if name.endswith(".index.json") and (out / name).is_file():
            names += sorted(set(json.loads((out / name).read_text(encoding="utf-8"))["weight_map"].values()))
    return names


def read_method(ckpt: str | Path) -> dict[str, Any]:
    """A checkpoint's tunelab_method.json; one line naming the file when it is missing or unreadable."""
    path = Path(ckpt) / METHOD_FILE
    if not path.is_file():
        raise TunelabError(f"{ckpt} is not a tunelab checkpoint (no {METHOD_FILE})")
    meta = integrity.read_json(path)
    if not isinstance(meta, dict) or "finetuning_type" not in meta:
        raise TunelabError(f"{path} is unreadable or names no finetuning_type: the checkpoint is damaged")
    return meta


def _method_of(ckpt: str | Path, meta: dict[str, Any]) -> Method:
    return get_method(meta["finetuning_type"], f" in checkpoint {ckpt}")


def load_trainable(model: nn.Module, ckpt: str | Path, meta: dict[str, Any], is_trainable: bool = False) -> nn.Module:
    """Put one checkpoint's weights onto `model` (the base model or an already prepared one)."""
    return _method_of(ckpt, meta).load(model, Path(ckpt), is_trainable)


def restore_trainable(model: nn.Module, ckpt: str | Path, meta: dict[str, Any]) -> None:
    """Load a checkpoint's trained weights into an already *prepared* model (resuming a run)."""
    _method_of(ckpt, meta).restore(model, Path(ckpt))


def base_model_for(checkpoints: list[str]) -> str | None:
    """The model a checkpoint list sits on: a whole-model (full) checkpoint is itself the base; else the
    recorded base."""
    if not checkpoints:
        return None
    first = read_method(checkpoints[0])
    return checkpoints[0] if _method_of(checkpoints[0], first).whole_model else first.get("base_model")


def model_to_load(name: str | None, checkpoints: list[str]) -> str | None:
    """The model to load before `checkpoints` apply: a first whole-model (full) checkpoint itself, even when
    --model_name_or_path (`name`) is given: it names that checkpoint's base, whose shape methods/fit.py checks;
    else `name`, else the base the checkpoints record (None: the default model)."""
    if checkpoints and (not name or _method_of(checkpoints[0], read_method(checkpoints[0])).whole_model):
        return base_model_for(checkpoints)
    return name


def load_checkpoints(model: nn.Module, checkpoints: list[str], merge: bool = True) -> tuple[nn.Module, dict]:
    """Apply checkpoints in order. Adapters (LoRA) are merged into the weights (several merge in order)
    when `merge`; the last one stays a live adapter when not. Returns the model and the last method."""
    meta: dict[str, Any] = {"finetuning_type": "none"}
    for i, ckpt in enumerate(checkpoints):
        meta = read_method(ckpt)
        method = _method_of(ckpt, meta)
        if method.whole_model and i > 0:
            raise TunelabError(f"a {method.name} checkpoint ({ckpt}) can only come first in --checkpoint_dir")
        model = method.load(model, Path(ckpt), False)
        is_last = i == len(checkpoints) - 1
        if method.merge is not None and (merge or not is_last):
            model = method.merge(model)
    return model, meta


def continue_checkpoint(model: nn.Module, ckpt: str | Path) -> tuple[nn.Module, MethodInfo]:
    """`model` with checkpoint `ckpt`'s weights loaded trainable, to go on training them (2023's
    --resume_lora_training): what trains is what the checkpoint trained, with its own settings (rank,
    targets), whatever the method flags say now."""
    meta = read_method(ckpt)
    method = _method_of(ckpt, meta)
    model = method.load(model, Path(ckpt), True)
    skip = {"finetuning_type", "trainable_params", "all_params", "trainable_percent", "layers", "modules",
            "base_model", "base_shape", "files"}
    info = MethodInfo(method.name, list(meta.get("modules", [])), list(meta.get("layers", [])),
                      extra={k: v for k, v in meta.items() if k not in skip})
    info.trainable_params, info.all_params = count_params(model)
    return model, info


def split_checkpoints(checkpoint_dir: str | None) -> list[str]:
    """--checkpoint_dir's folders; a missing or incomplete one (tunelab/integrity.py) is refused."""
    ckpts = [c.strip() for c in (checkpoint_dir or "").split(",") if c.strip()]
    for c in ckpts:
        if not Path(c).is_dir():
            raise TunelabError(f"checkpoint directory not found: {c}")
        problem = integrity.checkpoint_problem(c)
        if problem:
            whole = integrity.complete_checkpoints(c if integrity.checkpoint_step(c) is None else Path(c).parent)
            hint = f"; its last complete checkpoint is {whole[-1][1]}" if whole else ""
            raise TunelabError(f"checkpoint {c} is incomplete: {problem}{hint}")
    return ckpts
