"""`tunelab train`: one stage of the 2023 toolkit's `finetune.py` — train, eval or predict.

    tunelab train --do_train --dataset haruhi_persona_train --finetuning_type lora \
        --lora_target 25.attention.query_key_value --output_dir runs/x --plot_loss --fp16
    tunelab train cfg.yaml --learning_rate 1e-4      # a config file, flags override it
    tunelab eval --dataset haruhi_persona_test --checkpoint_dir runs/x --output_dir runs/x_eval

Training reads top to bottom in `run_train`: check options -> tokenizer + data -> model -> method ->
the shared trainer -> outputs. Eval and predict live in tunelab/evaluate.py.

Launched by `torchrun` / `accelerate launch` (tunelab/distributed.py) the same code trains data-parallel:
HF's Trainer runs DDP, DeepSpeed (`--deepspeed examples/deepspeed/zero2.json`) or FSDP (an accelerate
config); only rank 0 writes the run files, results and plot.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from tunelab import distributed
from tunelab.hparams import Args, TunelabError, check_stage, parse_args

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    run(parse_args(argv))
    return 0


def main_eval(argv: list[str]) -> int:
    return main(_with_stage(argv, "--do_eval"))


def main_predict(argv: list[str]) -> int:
    return main(_with_stage(argv, "--do_predict"))


def _with_stage(argv: list[str], flag: str) -> list[str]:
    rest = [a for a in argv if a not in ("--do_eval", "--do_predict")]
    if "--do_train" in rest:
        raise TunelabError(f"{flag[5:]} does not train: drop --do_train")
    # the short forms score generated answers too (BLEU/ROUGE), as the 2023 eval commands did
    return rest + [flag] + ([] if "--predict_with_generate" in rest else ["--predict_with_generate"])


def run(args: Args) -> dict[str, Any]:
    """Run the one stage the options ask for; returns its metrics."""
    stage = check_stage(args.training)
    if stage == "train":
        return run_train(args)
    from tunelab.evaluate import run_eval

    return run_eval(args, stage)


def resolve_precision(args: Args) -> None:
    """fp16 needs a GPU: on a CPU fall back to bf16 autocast where the CPU does bf16 fast, else fp32.
    With no precision flag on such a CPU, bf16 autocast is the default (≈2x fp32 here)."""
    import torch

    if torch.cuda.is_available():
        return
    fast_bf16 = cpu_has_fast_bf16()
    if args.training.fp16:
        logger.warning("--fp16 needs a GPU; training in %s on this CPU instead",
                       "bf16 autocast" if fast_bf16 else "fp32")
    elif "bf16" in args.explicit:
        return  # the user chose
    elif fast_bf16:
        logger.info("this CPU does bf16 fast: training in bf16 autocast (--bf16 false for fp32)")
    # use_cpu: TrainingArguments refuses bf16 without a GPU unless told the CPU is the device
    args.training = dataclasses.replace(args.training, fp16=False, bf16=fast_bf16, use_cpu=fast_bf16 or args.training.use_cpu)


def cpu_has_fast_bf16() -> bool:
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def prepare_training_args(args: Args) -> None:
    """Settings every tunelab run needs from HF's TrainingArguments."""
    resolve_precision(args)
    args.training = dataclasses.replace(
        args.training,
        remove_unused_columns=False,  # our model wrappers (P-Tuning) take **kwargs; keep labels
        report_to=[],
    )


def resolve_resume(args: Args) -> str | None:
    value = args.training.resume_from_checkpoint
    if not value:
        return None
    if str(value).lower() in ("true", "auto", "last", "1"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.training.output_dir) if Path(args.training.output_dir).is_dir() else None
        if last is None:
            raise TunelabError(f"--resume_from_checkpoint: no checkpoint-* folder in {args.training.output_dir}")
        return last
    if not Path(value).is_dir():
        raise TunelabError(f"--resume_from_checkpoint: checkpoint folder not found: {value}")
    return str(value)


def load_base(args: Args):
    """(model, tokenizer, base path, checkpoint list): the base model recorded by the checkpoints when
    --model_name_or_path is not given, so eval of a run needs only --checkpoint_dir."""
    import torch

    from tunelab.methods import base_model_for, split_checkpoints
    from tunelab.model import load_model_and_tokenizer

    ckpts = split_checkpoints(args.model.checkpoint_dir)
    model_args = args.model
    if ckpts and not model_args.model_name_or_path:
        model_args = dataclasses.replace(model_args, model_name_or_path=base_model_for(ckpts))
    model, tokenizer, path = load_model_and_tokenizer(model_args, dtype=torch.float32)
    return model, tokenizer, str(path), ckpts


def run_train(args: Args) -> dict[str, Any]:
    from transformers import DataCollatorForSeq2Seq, set_seed

    from tunelab import methods, runinfo
    from tunelab.layer_cache import lower_layer_cache
    from tunelab.preprocess import build_dataset
    from tunelab.trainer import TunelabTrainer

    if args.finetune.finetuning_type == "none":
        raise TunelabError("finetuning_type none trains nothing: use it with --do_eval or --do_predict")
    out = runinfo.check_output_dir(args)
    resume = resolve_resume(args)
    prepare_training_args(args)
    distributed.setup(args)
    distributed.barrier()  # every rank has checked output_dir before rank 0 writes into it
    model, tokenizer, base_path, ckpts = load_base(args)
    tokenizer.padding_side = "right"
    with args.training.main_process_first(desc="tokenize"):  # one rank per node tokenizes; the rest hit its cache
        dataset = build_dataset(args.data, tokenizer, "train")
    if ckpts:  # continue from earlier checkpoints: their weights become part of the base
        model, _ = methods.load_checkpoints(model, ckpts, merge=True)
    set_seed(args.training.seed)  # new weights (LoRA A, prefixes) start alike in every run and on every rank
    model, info = methods.prepare_model(model, args.finetune)
    if distributed.is_main():
        print(info.summary(), flush=True)
        runinfo.write_run_files(out, args, {"trainable.json": info.to_dict()})
    trainer = TunelabTrainer(
        model=model, args=args.training, train_dataset=dataset, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
        method_info=info, base_model=base_path, run_args=args.to_dict())
    with lower_layer_cache(model, info, args):  # exact: frozen layers below the trained ones run once per sample
        result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    metrics = dict(result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if args.finetune.plot_loss and distributed.is_main():
        from tunelab.plotting import plot_loss

        plot_loss(out)
    return metrics
