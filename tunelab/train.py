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
import os
import sys
from pathlib import Path
from typing import Any

from tunelab import distributed
from tunelab.hparams import Args, TunelabError, check_stage, parse_args

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    from tunelab.signals import Interrupted

    try:
        run(parse_args(argv))
    except Interrupted as err:  # the run is marked interrupted and its last step checkpointed
        print(f"tunelab: {err}: stopped; --resume_from_checkpoint true continues the run", file=sys.stderr)
        return err.exit_code
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


def run_train(args: Args) -> dict[str, Any]:
    """Check the output dir and the checkpoint to resume from, then train with run_status.json saying how it
    went (tunelab/integrity.py); a signal stops it after the step with a checkpoint (tunelab/signals.py)."""
    from tunelab import runinfo, signals
    from tunelab.methods import get_method, split_checkpoints
    from tunelab.resume import clear_old_checkpoints, resolve_resume
    from tunelab.setup import training_args

    if not get_method(args.finetune.finetuning_type).trains:
        raise TunelabError(f"finetuning_type {args.finetune.finetuning_type} trains nothing: use it with --do_eval or "
                           "--do_predict")
    out = runinfo.check_output_dir(args)
    resume = resolve_resume(args.training.resume_from_checkpoint, out)
    if args.run.overwrite_output_dir and not resume:
        clear_old_checkpoints(out, split_checkpoints(args.model.checkpoint_dir))
    training, _ = distributed.setup(training_args(args))
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

    before = integrity.read_status(out)
    if distributed.is_main() and before.get("status") == "running" and before.get("pid") == os.getpid():
        try:
            integrity.set_status(out, status, error)
        except OSError as err:  # the disk that failed the run may fail this too; the run's own error matters
            logger.warning("could not record the run as %s in %s: %s", status, out, err)


def _train(args: Args, out: Path, resume: str | None) -> dict[str, Any]:
    """Model -> data -> method -> the shared trainer -> weights, trainer_state.json, train_results.json."""
    from transformers import DataCollatorForSeq2Seq, set_seed

    from tunelab import integrity, methods, runinfo, signals
    from tunelab.layer_cache import lower_layer_cache
    from tunelab.preprocess import build_dataset
    from tunelab.resume import Bookkeeping, whole_run_loss
    from tunelab.setup import setup_model
    from tunelab.trainer import TunelabTrainer

    # earlier checkpoints (--checkpoint_dir) are merged in: their weights become part of the base
    loaded = setup_model(args, "train")
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "right"
    with args.training.main_process_first(desc="tokenize"):  # one rank per node tokenizes; the rest hit its cache
        dataset = build_dataset(args.data, tokenizer, "train")
    set_seed(args.training.seed)  # new weights (LoRA A, prefixes) start alike in every run and on every rank
    model, info = methods.prepare_model(model, args.finetune)
    if distributed.is_main():
        print(info.summary(), flush=True)
        runinfo.write_run_files(out, args, {"trainable.json": info.to_dict()})
        integrity.set_status(out, "running", resumed_from=resume)
    trainer = TunelabTrainer(
        model=model, args=args.training, train_dataset=dataset, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
        method_info=info, base_model=loaded.base_path, run_args=args.to_dict(), callbacks=[Bookkeeping()])
    signals.check()  # a signal during set-up: nothing trained yet, nothing to save
    with lower_layer_cache(model, info, args):  # exact: frozen layers below the trained ones run once per sample
        result = trainer.train(resume_from_checkpoint=resume)
    signals.check()  # stopped early by a signal: the checkpoint of the last step is saved, the run is not done
    trainer.save_model()
    metrics = {**result.metrics, "train_loss": whole_run_loss(trainer.state.log_history) or result.training_loss}
    if resume:
        metrics["train_resumed_from_step"] = integrity.checkpoint_step(resume)
    trainer.log_metrics("train", metrics)
    if trainer.is_world_process_zero():
        runinfo.write_json(out / "trainer_state.json", dataclasses.asdict(trainer.state))
        integrity.set_status(out, "done")  # the weights and state are whole: --checkpoint_dir may load them
        runinfo.save_results(out, "train", metrics)  # last: a study reads it as "this stage finished"
    if args.finetune.plot_loss and distributed.is_main():
        from tunelab.plotting import plot_loss

        plot_loss(out)
    return metrics
