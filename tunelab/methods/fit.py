"""Does a checkpoint fit the model it is about to be loaded onto? Answered from metadata only, before any
weight is read: a checkpoint of another model or shape fails in one line instead of peft's AttributeError or
torch's 30-line `size mismatch` dump after the model has loaded.

    check_checkpoints(model_args, checkpoints)   # --checkpoint_dir: eval, predict, chat, serve, export, train
    check_resume(resume, args)                   # --resume_from_checkpoint: same method, base and settings
    base_shape(config)                           # what tunelab_method.json records of the base at save time

What is compared, first mismatch reported:
1. the base's shape recorded at save time (`base_shape` in tunelab_method.json: model_type, hidden_size,
   num_hidden_layers, vocab_size) with the config.json of the model about to be used; checkpoints saved
   before this record existed skip this step;
2. every saved tensor's shape (read from the safetensors header with `safe_open`, never the tensors) with
   the parameter it lands on, on a weightless copy of the model (meta device, built from config.json); the
   method says how its names map onto the model's (`Method.fits`: LoRA's A/B factors, Freeze's weights,
   P-Tuning's per-layer key/value width);
3. for a resume, the method and its settings (rank, targets, prefix length, ...) with the ones this run
   prepares: the checkpoint's optimizer state only fits the same trained weights.

Models with their own code (--trust_remote_code) are not built weightless (that would run their code):
only step 1 and the method's config-level checks run for them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from tunelab.errors import TunelabError
from tunelab.targets import num_layers

if TYPE_CHECKING:
    from tunelab.hparams import Args, ModelArguments

logger = logging.getLogger(__name__)

SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
Shapes = Mapping[str, tuple[int, ...]]


# ---- the base's shape ----

def base_shape(config: Any) -> dict[str, Any]:
    """{model_type, hidden_size, num_hidden_layers, vocab_size} of a HF config (its text part for a
    multimodal one); a field the config lacks is left out."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shape = {"model_type": getattr(config, "model_type", None), "hidden_size": getattr(text, "hidden_size", None),
             "num_hidden_layers": _layers(text), "vocab_size": getattr(text, "vocab_size", None)}
    return {k: v for k, v in shape.items() if v is not None}


def _layers(config: Any) -> int | None:
    try:
        return num_layers(config)
    except Exception:  # noqa: BLE001  (a config without a layer count: nothing to compare)
        return None


def describe(shape: Mapping[str, Any]) -> str:
    """'llama, hidden 32, 4 layers, vocab 320'."""
    parts = [str(shape.get("model_type", "?"))]
    for key, word in (("hidden_size", "hidden {}"), ("num_hidden_layers", "{} layers"), ("vocab_size", "vocab {}")):
        if key in shape:
            parts.append(word.format(shape[key]))
    return ", ".join(parts)


def shape_difference(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """The first field of SHAPE_KEYS both records hold with different values, in words; None when they agree."""
    for key in SHAPE_KEYS:
        if key in saved and key in now and saved[key] != now[key]:
            return f"{key} {saved[key]} there, {now[key]} here"
    return None


# ---- metadata readers ----

def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TunelabError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise TunelabError(f"{path} does not hold a JSON object")
    return data


def load_config(path: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def weightless_model(config):
    """The model of `config` on the meta device: every parameter's name and shape, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def weightless_shapes(config) -> dict[str, tuple[int, ...]] | None:
    """{parameter name: shape} of the model of `config`; None when it cannot be built weightless."""
    try:
        model = weightless_model(config)
    except Exception as err:  # noqa: BLE001  (the real load reports whatever this cannot do)
        logger.debug("no weightless model for the checkpoint check: %s", err)
        return None
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


# ---- the checks ----

def model_in_use(model_args: ModelArguments, checkpoints: list[str]) -> tuple[str, Any]:
    """(what to call it, config) of the model the checkpoints will be applied to (methods.model_to_load: a
    first full checkpoint is that model itself; else --model_name_or_path, else the recorded base)."""
    from tunelab.methods import model_to_load
    from tunelab.model import resolve_model_path

    name = model_to_load(model_args.model_name_or_path, checkpoints)
    path = resolve_model_path(name)
    return f"the model {name or path}", load_config(path)


def check_checkpoints(model_args: ModelArguments, checkpoints: list[str]) -> None:
    """Raise one TunelabError when a --checkpoint_dir checkpoint does not fit the model it will be applied
    to (see the module docstring); a full checkpoint given with --model_name_or_path must have that shape."""
    if not checkpoints:
        return
    from tunelab.methods import get_method, read_method

    what, config = model_in_use(model_args, checkpoints)
    now = base_shape(config)
    first = read_method(checkpoints[0])
    if get_method(first.get("finetuning_type", "?")).whole_model and model_args.model_name_or_path:
        given = base_shape(model_in_use(model_args, [])[1])
        difference = shape_difference(given, now)
        if difference:
            raise TunelabError(f"checkpoint {checkpoints[0]} (full fine-tuning, {describe(now)}) is not a fine-tune "
                               f"of --model_name_or_path {model_args.model_name_or_path} ({describe(given)}): "
                               f"{difference}")
    shapes = None if model_args.trust_remote_code else weightless_shapes(config)
    for ckpt in checkpoints:
        problem = checkpoint_misfit(ckpt, read_method(ckpt), config, now, shapes)
        if problem:
            raise TunelabError(f"{problem}; it cannot be applied to {what} ({describe(now)})")


def run_model(model_args: ModelArguments) -> tuple[str, Any]:
    """(what to call it, config) of the model a training run starts from: its --checkpoint_dir's model,
    else --model_name_or_path (None: the default model)."""
    from tunelab.methods import split_checkpoints

    return model_in_use(model_args, split_checkpoints(model_args.checkpoint_dir))


def checkpoint_misfit(ckpt: str, meta: Mapping[str, Any], config, now: Mapping[str, Any],
                      shapes: Shapes | None) -> str | None:
    """Why checkpoint `ckpt` (its tunelab_method.json is `meta`) does not fit a model of `config` (shape record
    `now`, parameter shapes `shapes` or None), starting 'checkpoint ... (method, trained on ...)'; None: it fits."""
    from tunelab.methods import get_method

    method = get_method(meta.get("finetuning_type", "?"), f" in checkpoint {ckpt}")
    saved = meta.get("base_shape")
    trained_on = describe(saved) if isinstance(saved, dict) else meta.get("base_model") or "an unrecorded base"
    head = f"checkpoint {ckpt} ({method.label}, trained on {trained_on})"
    difference = shape_difference(saved, now) if isinstance(saved, dict) else None
    if difference:
        return f"{head} does not fit: {difference}"
    if method.fits is None or method.whole_model:
        return None
    problem = method.fits(Path(ckpt), config, shapes)
    return f"{head} does not fit: {problem}" if problem else None


def check_resume(resume: str, args: Args) -> None:
    """--resume_from_checkpoint must be a checkpoint of this run's method, base and method settings: the
    optimizer state it holds belongs to exactly those trained weights."""
    from tunelab.methods import METHOD_FILE, get_method, read_method

    if not (Path(resume) / METHOD_FILE).is_file():
        return  # not a tunelab checkpoint: the Trainer's own loading reports what is missing
    meta = read_method(resume)
    saved, wanted = meta.get("finetuning_type"), args.finetune.finetuning_type
    if saved != wanted:
        label = get_method(saved, f" in checkpoint {resume}").label
        raise TunelabError(f"--resume_from_checkpoint {resume} is a {label} checkpoint ({saved}); this run trains "
                           f"--finetuning_type {wanted}: resume with --finetuning_type {saved}, or start a new "
                           "--output_dir")
    if args.model.trust_remote_code:
        return
    what, config = run_model(args.model)
    now = base_shape(config)
    problem = checkpoint_misfit(resume, meta, config, now, weightless_shapes(config))
    if problem:
        raise TunelabError(f"--resume_from_checkpoint: {problem}; this run trains {what} ({describe(now)})")
    if not args.model.checkpoint_dir:  # a run going on from --checkpoint_dir trains that checkpoint's settings
        _check_settings(resume, meta, config, args)


def _check_settings(resume: str, meta: Mapping[str, Any], config, args: Args) -> None:
    """The method's settings the checkpoint records (lora_rank, pre_seq_len, ...) must be this run's, and the
    method prepared on a weightless model must train the modules the checkpoint trained."""
    from tunelab.methods import get_method, prepare_model

    for key in get_method(meta["finetuning_type"]).options:
        value = getattr(args.finetune, key)
        if key in meta and meta[key] != value:
            raise TunelabError(f"--resume_from_checkpoint {resume} was trained with {key} {meta[key]}; this run asks "
                               f"for {value} (--{key}): resume with the checkpoint's settings, or start a new "
                               "--output_dir")
    try:
        _, info = prepare_model(weightless_model(config), args.finetune)
    except TunelabError:
        raise
    except Exception as err:  # noqa: BLE001  (P-Tuning's set-up reads values; the real run reports the rest)
        logger.debug("weightless resume check skipped: %s", err)
        return
    if "modules" in meta and set(meta["modules"]) != set(info.modules):
        extra = sorted(set(info.modules) - set(meta["modules"]))
        missing = sorted(set(meta["modules"]) - set(info.modules))
        which = f"{extra[0]} is not among them" if extra else f"{missing[0]} is not among this run's"
        raise TunelabError(f"--resume_from_checkpoint {resume} trained {len(meta['modules'])} modules, this run "
                           f"targets {len(info.modules)} ({which}): resume with the checkpoint's --lora_target / "
                           "--target_layers / --name_module_trainable, or start a new --output_dir")
