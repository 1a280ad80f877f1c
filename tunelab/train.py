"""`tunelab train`: one stage of the 2023 toolkit's `finetune.py` — train, eval or predict.

    tunelab train --do_train --dataset haruhi_persona_train --finetuning_type lora \
        --lora_target 25.attention.query_key_value --output_dir runs/x --plot_loss --fp16
    tunelab train cfg.yaml --learning_rate 1e-4      # a config file, flags override it
    tunelab eval --dataset haruhi_persona_test --checkpoint_dir runs/x --output_dir runs/x_eval

Training reads top to bottom: `run_train` checks the output dir and the checkpoint to resume from
(tunelab/resume.py) and records the run's status (run_status.json, tunelab/integrity.py) under the signal
handling of tunelab/signals.py; `_train` goes model + tokenizer (tunelab/setup.py) -> data -> method -> the
shared trainer -> outputs. Eval and predict live in tunelab/evaluate.py.

Launched by `torchrun` / `accelerate launch` (tunelab/distributed.py) the same code trains data-parallel:
HF's Trainer runs DDP, DeepSpeed (`--deepspeed examples/deepspeed/zero2.json`) or FSDP (an accelerate
config); only rank 0 writes the run files, results and plot.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from tunelab import distributed
from tunelab.hparams import Args, TunelabError, check_stage, parse_args
from tunelab.validate import check_inputs

logger = logging.getLogger(__name__)


def main(argv: list[str], prog: str = "tunelab train") -> int:
    from tunelab.signals import Interrupted

    try:
        run(parse_args(argv, prog=prog))
    except Interrupted as err:  # the run is marked interrupted (training: its last step checkpointed)
        print(f"tunelab: {err}: stopped; {err.next_step}", file=sys.stderr)
        return err.exit_code
    return 0


def main_eval(argv: list[str]) -> int:
    return main(_with_stage(argv, "--do_eval"), prog="tunelab eval")


def main_predict(argv: list[str]) -> int:
    return main(_with_stage(argv, "--do_predict"), prog="tunelab predict")


def _with_stage(argv: list[str], flag: str) -> list[str]:
    rest = [a for a in argv if a not in ("--do_eval", "--do_predict")]
    if "--do_train" in rest:
        raise TunelabError(f"{flag[5:]} does not train: drop --do_train")
    # the short forms score generated answers too (BLEU/ROUGE), as the 2023 eval commands did
    return rest + [flag] + ([] if "--predict_with_generate" in rest else ["--predict_with_generate"])


def run(args: Args) -> dict[str, Any]:
    """Run the one stage the options ask for; returns its metrics."""
    from tunelab.logs import quiet_known_warnings

    quiet_known_warnings()  # also for a study's worker processes, which do not pass through the CLI
    stage = check_stage(args.training)
    check_inputs(args, stage)  # output dir, data sets, method targets: before any model loads
    if stage == "train":
        return run_train(args)
    from tunelab.evaluate import run_eval

    return run_eval(args, stage)


def run_evals(args_list: list[Args]) -> list[dict[str, Any]]:
    """Run several eval/predict stages of one model (a study row's eval sets); their metrics in order. Stages of
    one kind that differ only in their data share the model and one generation (tunelab.evaluate.run_evals)."""
    from tunelab.evaluate import run_evals as evaluate_sets
    from tunelab.logs import quiet_known_warnings

    quiet_known_warnings()
    stages = [check_stage(args.training) for args in args_list]
    if "train" in stages or len(set(stages)) > 1:
        return [run(args) for args in args_list]
    for args in args_list:
        check_inputs(args, stages[0])
    return evaluate_sets(args_list, stages[0])


def run_train(args: Args) -> dict[str, Any]:
    """Check the output dir and the checkpoint to resume from, then train with run_status.json saying how it
    went (tunelab/integrity.py); a signal stops it after the step with a checkpoint (tunelab/signals.py)."""
    from tunelab import runinfo, signals
    from tunelab.logs import trainer_progress
    from tunelab.methods import get_method, split_checkpoints
    from tunelab.methods.fit import check_resume
    from tunelab.resume import clear_old_checkpoints, resolve_resume
    from tunelab.setup import check_model_options, training_args

    if not get_method(args.finetune.finetuning_type).trains:
        raise TunelabError(f"finetuning_type {args.finetune.finetuning_type} trains nothing: use it with --do_eval or "
                           "--do_predict")
    check_model_options(args.model)
    check_eval_data(args)
    out = runinfo.check_output_dir(args)
    resume = resolve_resume(args.training.resume_from_checkpoint, out)
    if resume:  # same method, base and settings, or one line saying what differs
        check_resume(resume, args)
    if args.run.overwrite_output_dir and not resume:
        clear_old_checkpoints(out, split_checkpoints(args.model.checkpoint_dir))
    training, _ = distributed.setup(training_args(args))
    training = trainer_progress(training, args.explicit)  # a line per logging step when stderr is a file
    args = dataclasses.replace(args, training=training)
    distributed.barrier()  # every rank has checked output_dir before rank 0 writes into it
    with signals.graceful():
        try:
            metrics = _train(args, out, resume)  # marks the run "running" once it writes into out
        except KeyboardInterrupt as err:
            _mark_if_started(out, "interrupted", f"{err}: --resume_from_checkpoint true continues it")
            raise
        except BaseException as err:
            _mark_if_started(out, "failed", f"{type(err).__name__}: {err}")
            raise
    return metrics


def _mark_if_started(out: Path, status: str, error: str) -> None:
    """Record how this process's run ended; a run that failed before writing anything leaves nothing."""
    from tunelab import integrity

    if distributed.is_main():
        integrity.mark_ended(out, status, error)


def _train(args: Args, out: Path, resume: str | None) -> dict[str, Any]:
    """Model -> data -> method -> the shared trainer -> weights, trainer_state.json, train_results.json."""
    from transformers import DataCollatorForSeq2Seq, set_seed

    from tunelab import eval_likelihood, integrity, runinfo, signals
    from tunelab.layer_cache import lower_layer_cache
    from tunelab.nonfinite import NonFiniteGuard
    from tunelab.resume import Bookkeeping, earlier_runtime, whole_run_metrics
    from tunelab.setup import setup_training_model
    from tunelab.trainer import TunelabTrainer, supervised_tokens

    # earlier checkpoints (--checkpoint_dir) are merged in, their weights part of the base; a last LoRA one
    # goes on training with --resume_lora_training (setup_training_model)
    loaded, go_on = setup_training_model(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "right"
    with args.training.main_process_first(desc="tokenize"):  # one rank per node tokenizes; the rest hit its cache
        dataset, eval_dataset = training_data(args, tokenizer)
    args = _with_plot_logging(args, len(dataset))
    # --eval_likelihood: the base's log-probs on the eval rows, before the method changes the model
    likelihood = eval_likelihood.prepare(args, model, eval_dataset, tokenizer, loaded.base_path, loaded.checkpoints)
    set_seed(args.training.seed)  # new weights (LoRA A, prefixes) start alike in every run and on every rank
    model, info = prepare_method(model, args, go_on)
    if distributed.is_main():
        print(info.summary(), flush=True)
        runinfo.write_run_files(out, args, {"trainable.json": info.to_dict()})
        integrity.set_status(out, "running", resumed_from=resume)
    trainer = TunelabTrainer(
        model=model, args=args.training, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
        callbacks=[Bookkeeping(earlier_runtime(resume)), *callbacks(args)], method_info=info,
        base_model=loaded.base_path, run_args=args.to_dict(), likelihood=likelihood)
    trainer.add_callback(NonFiniteGuard(skip=args.run.skip_nonfinite))  # a NaN/inf step stops the run (or is skipped)
    signals.check()  # a signal during set-up: nothing trained yet, nothing to save
    with lower_layer_cache(model, info, args) as store:  # exact: frozen layers below the trained ones run once
        result = trainer.train(resume_from_checkpoint=resume)  # per sample
        signals.check()  # stopped early by a signal: the checkpoint of the last step is saved, the run is not done
        trainer.save_model()
        metrics = whole_run_metrics(result.metrics, trainer.state, resume)  # a resumed run reports the whole run
        # the positions the output projection ran over, whole run (the study's FLOP count)
        metrics["train_supervised_tokens"] = round(supervised_tokens(dataset["labels"]) * (trainer.state.epoch or 0))
        if store is not None:
            metrics.update({f"train_{key}": value for key, value in store.records().items()})
        if resume:
            metrics["train_resumed_from_step"] = integrity.checkpoint_step(resume)
        trainer.log_metrics("train", metrics)
        if eval_dataset is not None and args.training.do_eval:  # the final model's eval loss, as HF's examples
            evaluated = trainer.evaluate()
            trainer.log_metrics("eval", evaluated)
            if trainer.is_world_process_zero():
                runinfo.save_results(out, "eval", evaluated)
            metrics.update(evaluated)
    if trainer.is_world_process_zero():
        runinfo.write_json(out / "trainer_state.json", dataclasses.asdict(trainer.state))
        integrity.set_status(out, "done")  # the weights and state are whole: --checkpoint_dir may load them
        runinfo.save_results(out, "train", metrics)  # last: a study reads it as "this stage finished"
    if distributed.is_main():
        if args.finetune.plot_loss:
            from tunelab.plotting import plot_loss

            plot_loss(out)
        print(finished_message(out, args), flush=True)
    return metrics


def _with_plot_logging(args: Args, rows: int) -> Args:
    """With --plot_loss and no --logging_steps given, log often enough that a short run draws a curve."""
    if not args.finetune.plot_loss or "logging_steps" in args.explicit:
        return args
    from tunelab.plotting import logging_steps_for

    t = args.training
    batches = math.ceil(rows / (t.per_device_train_batch_size * max(1, t.world_size)))
    per_epoch = max(1, batches // t.gradient_accumulation_steps)  # optimizer steps, as HF's Trainer counts them
    planned = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    steps = logging_steps_for(planned, t.logging_steps)
    if steps == t.logging_steps:
        return args
    return dataclasses.replace(args, training=dataclasses.replace(t, logging_steps=steps))


def next_command(out: Path, args: Args) -> str:
    """The predict command that scores the run just trained: on the test split of its data set where
    dataset_info.json has one (`x_train` -> `x_test`), else on its own data set."""
    from tunelab.data import dataset_names, load_dataset_info

    names = dataset_names(args.data.dataset)
    known = load_dataset_info(args.data.dataset_dir)
    tests = [n[: -len("_train")] + "_test" for n in names if n.endswith("_train")]
    dataset = ",".join(tests) if tests and all(t in known for t in tests) else args.data.dataset
    argv = ["tunelab", "predict", "--checkpoint_dir", str(out), "--dataset", dataset]
    if args.data.dataset_dir != "data":
        argv += ["--dataset_dir", args.data.dataset_dir]
    argv += ["--output_dir", f"{out}_predict", "--max_samples", "100", "--compare_base"]
    return " ".join(shlex.quote(a) for a in argv)


def finished_message(out: Path, args: Args) -> str:
    """What `tunelab train` prints last: where the outputs are, and the next command to run."""
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    return "\n".join([f"outputs in {out}/: {', '.join(files)}", f"next, score it: {next_command(out, args)}"])


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
