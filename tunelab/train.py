"""`tunelab train`: one stage of the 2023 toolkit's `finetune.py` — train, eval or predict.

    tunelab train --do_train --dataset haruhi_persona_train --finetuning_type lora \
        --lora_target 25.attention.query_key_value --output_dir runs/x --plot_loss --fp16
    tunelab train cfg.yaml --learning_rate 1e-4      # a config file, flags override it
    tunelab eval --dataset haruhi_persona_test --checkpoint_dir runs/x --output_dir runs/x_eval

Training reads top to bottom in `run_train`: check options -> model + tokenizer (tunelab/setup.py) ->
data -> method -> the shared trainer -> outputs. Eval and predict live in tunelab/evaluate.py.

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


def run_train(args: Args) -> dict[str, Any]:
    from transformers import DataCollatorForSeq2Seq, set_seed

    from tunelab import runinfo
    from tunelab.layer_cache import lower_layer_cache
    from tunelab.methods import get_method
    from tunelab.setup import check_model_options, setup_training_model, training_args
    from tunelab.trainer import TunelabTrainer

    if not get_method(args.finetune.finetuning_type).trains:
        raise TunelabError(f"finetuning_type {args.finetune.finetuning_type} trains nothing: use it with --do_eval or "
                           "--do_predict")
    check_model_options(args.model)
    check_eval_data(args)
    out = runinfo.check_output_dir(args)
    resume = resolve_resume(args)
    training, _ = distributed.setup(training_args(args))
    args = dataclasses.replace(args, training=training)
    distributed.barrier()  # every rank has checked output_dir before rank 0 writes into it
    # earlier checkpoints (--checkpoint_dir) are merged in, their weights part of the base; a last LoRA one
    # goes on training with --resume_lora_training (setup_training_model)
    loaded, go_on = setup_training_model(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "right"
    with args.training.main_process_first(desc="tokenize"):  # one rank per node tokenizes; the rest hit its cache
        dataset, eval_dataset = training_data(args, tokenizer)
    set_seed(args.training.seed)  # new weights (LoRA A, prefixes) start alike in every run and on every rank
    model, info = prepare_method(model, args, go_on)
    if distributed.is_main():
        print(info.summary(), flush=True)
        runinfo.write_run_files(out, args, {"trainable.json": info.to_dict()})
    trainer = TunelabTrainer(
        model=model, args=args.training, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
        callbacks=callbacks(args), method_info=info, base_model=loaded.base_path, run_args=args.to_dict())
    with lower_layer_cache(model, info, args):  # exact: frozen layers below the trained ones run once per sample
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        metrics = dict(result.metrics)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        if eval_dataset is not None and args.training.do_eval:  # the final model's eval loss, as HF's examples
            evaluated = trainer.evaluate()
            trainer.log_metrics("eval", evaluated)
            trainer.save_metrics("eval", evaluated)
            metrics.update(evaluated)
    trainer.save_state()
    if args.finetune.plot_loss and distributed.is_main():
        from tunelab.plotting import plot_loss

        plot_loss(out)
    return metrics


def check_eval_data(args: Args) -> None:
    """Before the model loads: --val_size leaves training rows, --eval_dataset names registered data sets."""
    from tunelab.data import load_examples
    from tunelab.preprocess import val_count

    if args.data.val_size:
        val_count(args.data.val_size, load_examples(args.data)[1].kept)
    if args.data.eval_dataset:
        load_examples(dataclasses.replace(args.data, dataset=args.data.eval_dataset))


def training_data(args: Args, tokenizer):
    """(train rows, eval rows or None): --val_size rows held out of the training set (seeded by --seed), or
    --eval_dataset's rows, both tokenized as training rows so that the eval loss is the training loss."""
    from tunelab.preprocess import build_dataset, split_for_eval

    dataset = build_dataset(args.data, tokenizer, "train")
    if args.data.val_size:
        return split_for_eval(dataset, args.data.val_size, args.training.seed)
    if args.data.eval_dataset:
        eval_data = dataclasses.replace(args.data, dataset=args.data.eval_dataset)
        return dataset, build_dataset(eval_data, tokenizer, "train")
    return dataset, None


def prepare_method(model, args: Args, go_on: str | None):
    """(model, MethodInfo): the method applied (or the last LoRA checkpoint's adapter going on training), on a
    quantized base after peft's k-bit preparation, with every trained weight in float32."""
    from tunelab import methods
    from tunelab.quantization import prepare_for_training
    from tunelab.setup import upcast_trainable

    model = prepare_for_training(model, args.training.gradient_checkpointing)  # a quantized base (QLoRA)
    if go_on:  # --resume_lora_training: the last LoRA checkpoint's adapter trains on
        logger.info("going on training the adapter of %s (--resume_lora_training false: a new one)", go_on)
        model, info = methods.continue_checkpoint(model, go_on)
    else:
        model, info = methods.prepare_model(model, args.finetune)
    if upcast_trainable(model):  # a 16-bit base (--torch_dtype): the weights that train stay fp32 master weights
        logger.info("trainable weights held in float32 over a %s base", args.model.torch_dtype)
    return model, info


def callbacks(args: Args) -> list:
    from transformers import EarlyStoppingCallback

    patience = args.run.early_stopping_patience
    return [EarlyStoppingCallback(early_stopping_patience=patience)] if patience else []
