"""Set up a run from its options: precision, base model, the checkpoint's options, checkpoints.

Every command that needs a model (train, eval/predict, chat/serve/webui, export) builds it here, in one
order — load the base -> take over the checkpoint's prompt options -> apply the checkpoints:

    from tunelab.setup import setup_model, training_args
    args = dataclasses.replace(args, training=training_args(args))   # precision + tunelab's fixed settings
    run = setup_model(args, "eval")
    run.model, run.tokenizer, run.base_path, run.checkpoints, run.method, run.args

Functions here return new values and never change the `Args` they are given (the study runner and the web
UI reuse one `Args` for several runs). Modelled on the `_setup_model` step of torchtune's recipes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.cpu import cpu_has_fast_bf16  # noqa: F401  (part of the set-up API; tests swap it here)
from tunelab.hparams import Args, DataArguments, ModelArguments, TunelabError
from tunelab.names import PROMPT_OPTIONS

logger = logging.getLogger(__name__)

# Options a checkpoint's run decides unless the user sets them again: eval must format prompts as training did.
INHERITED = PROMPT_OPTIONS


# ---- precision ----

@functools.cache  # once per process: the study and the web UI resolve precision for every run
def warn_slow_bf16() -> None:
    logger.warning("--bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): its bf16 matmuls are emulated, "
                   ">20x slower than fp32 as measured on such a CPU (`python -m bench.matmul` measures this one); "
                   "--bf16 false trains in fp32")


def resolve_precision(args: Args):
    """The training options with the precision this machine can run: unchanged on a GPU. fp16 needs a
    GPU: on a CPU it falls back to bf16 autocast where the CPU does bf16 fast, else fp32. With no precision
    flag on such a CPU, bf16 autocast is the default (≈2x fp32 here). A 16-bit base (--torch_dtype) runs
    under its own dtype's autocast, whatever the flags say."""
    import torch

    half = base_dtype(args.model)
    if half in (torch.bfloat16, torch.float16):
        return _half_base_precision(args, half)
    if torch.cuda.is_available():
        return args.training
    fast_bf16 = cpu_has_fast_bf16()
    if args.training.fp16:
        logger.warning("--fp16 needs a GPU; training in %s on this CPU instead",
                       "bf16 autocast" if fast_bf16 else "fp32")
    elif "bf16" in args.explicit:
        if args.training.bf16 and not fast_bf16:
            warn_slow_bf16()
        return args.training  # the user chose
    elif fast_bf16:
        logger.info("this CPU does bf16 fast: training in bf16 autocast (--bf16 false for fp32)")
    # use_cpu: TrainingArguments refuses bf16 without a GPU unless told the CPU is the device
    return dataclasses.replace(args.training, fp16=False, bf16=fast_bf16,
                               use_cpu=fast_bf16 or args.training.use_cpu)


def _half_base_precision(args: Args, dtype):
    """A bf16/fp16 base: autocast in that dtype, so frozen 16-bit weights and fp32 trained ones meet in one
    dtype in every matmul (without it a Freeze layer's fp32 weight would meet bf16 activations)."""
    import torch

    bf16 = dtype == torch.bfloat16
    if (args.training.bf16, args.training.fp16) != (bf16, not bf16) and {"bf16", "fp16"} & args.explicit:
        logger.warning("--torch_dtype %s: training under %s autocast (the base's dtype)", args.model.torch_dtype,
                       "bf16" if bf16 else "fp16")
    cpu = not torch.cuda.is_available()
    return dataclasses.replace(args.training, bf16=bf16, fp16=not bf16, use_cpu=cpu or args.training.use_cpu)


TORCH_DTYPE_NAMES = ("bfloat16", "float16", "float32")


def base_dtype(model_args: ModelArguments):
    """The torch dtype the frozen base loads in (--torch_dtype). `auto` is float32 on every CPU, also one with
    fast bf16: training there already holds the frozen linear weights in bf16 under autocast
    (tunelab/speedups.py), and fp32 norms/embeddings keep eval scores comparable with cached base passes;
    `--torch_dtype bfloat16` halves the memory. On a GPU `auto` is the checkpoint's own dtype (config.json's
    dtype/torch_dtype; float32 where it names none). float16 on a CPU is refused (check_torch_dtype)."""
    import torch

    check_torch_dtype(model_args.torch_dtype)
    name = model_args.torch_dtype
    if name == "auto":
        name = checkpoint_dtype(_base_path(model_args)) if torch.cuda.is_available() else "float32"
    return getattr(torch, name)


def check_torch_dtype(name: str) -> None:
    import torch

    if name == "float16" and not torch.cuda.is_available():
        raise TunelabError("--torch_dtype float16 needs a GPU: CPUs have no fast fp16 matmuls (slower than fp32) "
                           "and fp16's 5-bit exponent overflows without a GPU loss scaler; use --torch_dtype "
                           "bfloat16 (half the memory) or float32")


def checkpoint_dtype(path: str | Path) -> str:
    """The dtype a HF model directory's config.json names (transformers 5: dtype; 4.x: torch_dtype); float32
    when it names none or an unusual one."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in TORCH_DTYPE_NAMES else "float32"


def _base_path(model_args: ModelArguments) -> Path:
    from tunelab.methods import model_to_load, split_checkpoints
    from tunelab.model import resolve_model_path

    checkpoints = split_checkpoints(model_args.checkpoint_dir)
    return resolve_model_path(model_to_load(model_args.model_name_or_path, checkpoints))


def check_model_options(model_args: ModelArguments) -> None:
    """The model options this machine cannot run, refused in one line before anything loads or is written
    (train and eval call it first; load_base again)."""
    from tunelab.quantization import check_quantization

    check_torch_dtype(model_args.torch_dtype)
    check_quantization(model_args)
    check_attention(model_args)


def check_attention(model_args: ModelArguments) -> None:
    """flash_attention_2 needs CUDA, flash-attn and a 16-bit base: its kernels take fp16/bf16 only, and
    transformers casts fp32 queries to the dtype of the model's weights (which stays fp32 there)."""
    import importlib.util

    import torch

    if model_args.attn_implementation != "flash_attention_2":
        return
    if not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        raise TunelabError("--attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package: "
                           "use auto (on a CPU: tunelab's padding-free per-sample attention), sdpa or eager")
    if base_dtype(model_args) == torch.float32:
        raise TunelabError("--attn_implementation flash_attention_2 computes in 16 bits only: load the base with "
                           "--torch_dtype bfloat16 (or float16), or use sdpa for a float32 base")


def load_kwargs(model_args: ModelArguments, dtype) -> dict[str, Any]:
    """from_pretrained's extra arguments for the model options: quantization (tunelab/quantization.py) and
    an attention implementation other than transformers' default."""
    from tunelab.quantization import load_kwargs as quantization_kwargs

    kwargs = quantization_kwargs(model_args, dtype)
    if model_args.attn_implementation != "auto":
        kwargs["attn_implementation"] = model_args.attn_implementation
    return kwargs


def base_dtype_key(model_args: ModelArguments) -> list[str]:
    """What a cache key holds of the base's dtype: nothing for float32 (keys from before --torch_dtype
    stay valid), the dtype's name otherwise; and int4 / int8 for a --quantization_bit base."""
    import torch

    dtype = base_dtype(model_args)
    bits = [f"int{model_args.quantization_bit}"] if model_args.quantization_bit else []  # a quantized base differs
    return ([] if dtype == torch.float32 else [str(dtype).replace("torch.", "")]) + bits


def upcast_trainable(model) -> int:
    """Master weights: every parameter that trains is held in float32, so optimizer updates smaller than a
    16-bit weight's spacing (bf16: 2^-8 of its size) are not rounded away. Returns how many were cast."""
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def training_args(args: Args):
    """The training options every tunelab training run uses: resolved precision plus settings it needs
    from HF's TrainingArguments."""
    from tunelab.validate import measure_of

    training = resolve_precision(args)
    # HF's default direction is "greater is better" for any metric not named *loss; likelihood measures fall
    lower = measure_of(training.metric_for_best_model) and "greater_is_better" not in args.explicit
    return dataclasses.replace(
        training,
        remove_unused_columns=False,  # our model wrappers (P-Tuning) take **kwargs; keep labels
        prediction_loss_only=True,  # eval during training measures the loss (no logits kept)
        # early stopping compares evaluations: on the eval loss unless told otherwise
        metric_for_best_model=training.metric_for_best_model or ("loss" if args.run.early_stopping_patience else None),
        greater_is_better=False if lower else training.greater_is_better,
    )


def autocast(args: Args):
    """bf16 autocast when the run resolved to bf16 (CPUs with fast bf16, or asked for); else a no-op."""
    import torch

    if args.training.bf16:
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- model and checkpoints ----

def load_base(model_args: ModelArguments, checkpoints: list[str]):
    """(model, tokenizer, base path): `--model_name_or_path`, or when it is not given the base model the
    checkpoints record, so eval of a run needs only --checkpoint_dir; a first full checkpoint is itself the
    model (methods.model_to_load). Weights in --torch_dtype (base_dtype)."""
    from tunelab.methods import model_to_load
    from tunelab.model import load_model_and_tokenizer

    check_model_options(model_args)
    if checkpoints:  # a full checkpoint is the model itself
        model_args = dataclasses.replace(model_args,
                                         model_name_or_path=model_to_load(model_args.model_name_or_path, checkpoints))
    dtype = base_dtype(model_args)
    model, tokenizer, path = load_model_and_tokenizer(model_args, dtype=dtype, **load_kwargs(model_args, dtype))
    return model, tokenizer, str(path)


def inherit_from_checkpoint(args: Args, checkpoints: list[str]) -> DataArguments:
    """The data options with the last checkpoint's template, source_prefix, ... (`INHERITED`) wherever the
    user did not set them; the data options as given when there is no checkpoint."""
    from tunelab.runinfo import read_run_args

    if not checkpoints:
        return args.data
    trained = read_run_args(checkpoints[-1])
    updates = {k: trained[k] for k in INHERITED if k in trained and k not in args.explicit}
    if not updates:
        return args.data
    logger.info("from checkpoint %s: %s", checkpoints[-1], updates)
    return dataclasses.replace(args.data, **updates)


@dataclass(frozen=True)
class Setup:
    """What `setup_model` built."""

    model: Any
    tokenizer: Any
    base_path: str  # the base model's local directory
    checkpoints: list[str]  # --checkpoint_dir, split, in load order
    method: dict[str, Any]  # the last checkpoint's tunelab_method.json ({"finetuning_type": "none"} without one)
    args: Args  # the options given, with the checkpoint's data options inherited (not for "train")


def setup_base(args: Args, stage: str) -> Setup:
    """Load the base model and take over the checkpoint's prompt options; the checkpoints are not applied
    yet (`apply_checkpoints`), so a caller can score the base model on the same data first.

    `stage` "train" keeps the command's own data options (a run continuing from checkpoints formats its
    prompts as told, and its checkpoints become part of the base); every other stage (eval, predict, chat,
    export) formats prompts as the checkpoint's run did unless the user sets an option again.
    """
    from tunelab.methods import split_checkpoints
    from tunelab.methods.fit import check_checkpoints

    checkpoints = split_checkpoints(args.model.checkpoint_dir)
    check_checkpoints(args.model, checkpoints)  # another model's or shape's checkpoint: one line, nothing loaded
    model, tokenizer, base_path = load_base(args.model, checkpoints)
    if stage != "train":
        args = dataclasses.replace(args, data=inherit_from_checkpoint(args, checkpoints))
    return Setup(model, tokenizer, base_path, checkpoints, {"finetuning_type": "none"}, args)


def apply_checkpoints(base: Setup, merge: bool = True) -> Setup:
    """`base` with --checkpoint_dir's checkpoints applied in order (LoRA merged into the weights when `merge`;
    see methods.load_checkpoints). On a quantized base the last adapter stays live (merging into 4/8-bit
    weights would round it away)."""
    from tunelab.methods import load_checkpoints
    from tunelab.quantization import is_quantized

    model, method = load_checkpoints(base.model, base.checkpoints, merge=merge and not is_quantized(base.model))
    return dataclasses.replace(base, model=model, method=method)


def setup_model(args: Args, stage: str, merge: bool = True) -> Setup:
    """Load the base model, take over the checkpoint's prompt options, apply the checkpoints (setup_base, then
    apply_checkpoints)."""
    return apply_checkpoints(setup_base(args, stage), merge=merge)


def setup_training_model(args: Args) -> tuple[Setup, str | None]:
    """(setup, checkpoint to go on training) for `tunelab train`. As the 2023 toolkit: when the method is LoRA
    and the last --checkpoint_dir checkpoint is LoRA, --resume_lora_training true (default) merges the
    earlier checkpoints into the base and returns the last one, whose adapter goes on training
    (methods.continue_checkpoint); false merges them all (a new adapter is stacked on top); (setup, None)."""
    from tunelab.methods import read_method

    base = setup_base(args, "train")
    last = base.checkpoints[-1] if base.checkpoints else None
    go_on = (last is not None and args.finetune.resume_lora_training and args.finetune.finetuning_type == "lora"
             and read_method(last)["finetuning_type"] == "lora")
    if not go_on:
        return apply_checkpoints(base), None
    loaded = apply_checkpoints(dataclasses.replace(base, checkpoints=base.checkpoints[:-1]))
    return dataclasses.replace(loaded, checkpoints=base.checkpoints), last


# ---- records of what a run resolved ----

def decoding_record(args: Args) -> dict[str, Any]:
    """The decoding settings a run generated with (decoding.json; part of the base-predictions cache key)."""
    g = args.generation
    keys = ("generation_preset", "do_sample", "num_beams", "max_new_tokens", "max_length", "repetition_penalty")
    rec = {k: getattr(g, k) for k in keys}
    if g.do_sample:
        rec.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=args.training.seed)
    return rec
