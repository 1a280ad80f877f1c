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
import logging
from dataclasses import dataclass
from typing import Any

from tunelab.cpu import cpu_has_fast_bf16  # noqa: F401  (part of the set-up API; tests swap it here)
from tunelab.hparams import Args, DataArguments, ModelArguments
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
    flag on such a CPU, bf16 autocast is the default (≈2x fp32 here)."""
    import torch

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


def training_args(args: Args):
    """The training options every tunelab training run uses: resolved precision plus settings it needs
    from HF's TrainingArguments."""
    return dataclasses.replace(
        resolve_precision(args),
        remove_unused_columns=False,  # our model wrappers (P-Tuning) take **kwargs; keep labels
        report_to=[],
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
    checkpoints record, so eval of a run needs only --checkpoint_dir. Weights in float32."""
    import torch

    from tunelab.methods import base_model_for
    from tunelab.model import load_model_and_tokenizer

    if checkpoints and not model_args.model_name_or_path:
        model_args = dataclasses.replace(model_args, model_name_or_path=base_model_for(checkpoints))
    model, tokenizer, path = load_model_and_tokenizer(model_args, dtype=torch.float32)
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

    checkpoints = split_checkpoints(args.model.checkpoint_dir)
    model, tokenizer, base_path = load_base(args.model, checkpoints)
    if stage != "train":
        args = dataclasses.replace(args, data=inherit_from_checkpoint(args, checkpoints))
    return Setup(model, tokenizer, base_path, checkpoints, {"finetuning_type": "none"}, args)


def apply_checkpoints(base: Setup, merge: bool = True) -> Setup:
    """`base` with --checkpoint_dir's checkpoints applied in order (LoRA merged into the weights when `merge`;
    see methods.load_checkpoints)."""
    from tunelab.methods import load_checkpoints

    model, method = load_checkpoints(base.model, base.checkpoints, merge=merge)
    return dataclasses.replace(base, model=model, method=method)


def setup_model(args: Args, stage: str, merge: bool = True) -> Setup:
    """Load the base model, take over the checkpoint's prompt options, apply the checkpoints (setup_base, then
    apply_checkpoints)."""
    return apply_checkpoints(setup_base(args, stage), merge=merge)


# ---- records of what a run resolved ----

def decoding_record(args: Args) -> dict[str, Any]:
    """The decoding settings a run generated with (decoding.json; part of the base-predictions cache key)."""
    g = args.generation
    keys = ("generation_preset", "do_sample", "num_beams", "max_new_tokens", "max_length", "repetition_penalty")
    rec = {k: getattr(g, k) for k in keys}
    if g.do_sample:
        rec.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=args.training.seed)
    return rec
