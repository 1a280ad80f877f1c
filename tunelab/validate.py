"""Every option checked before anything heavy runs (model load, tokenisation), each error one line naming
the option and what it may be.

    from tunelab.validate import validate, check_inputs
    validate(values)             # pure: ranges of every option (hparams.parse_args calls it on the parsed values)
    check_inputs(args, stage)    # reads files: --output_dir, the data sets, the method's targets on an empty model
                                 # (train.run calls it before the model loads)

`validate` takes the flat option dict (`{"learning_rate": 5e-05, ...}`: what argparse parsed, or
`Args.to_dict()`), so it runs before HF's own dataclass checks and tracebacks from torch/peft/HF deep inside a
run never get the chance. The rules are one table (`RULES`): option, test, the valid range in words.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.hparams import Args


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def positive(v: Any) -> bool:
    return _number(v) and v > 0


def non_negative(v: Any) -> bool:
    return _number(v) and v >= 0


def fraction(v: Any) -> bool:
    """0 <= v < 1."""
    return _number(v) and 0 <= v < 1


def steps(v: Any) -> bool:
    """HF's step options: an integer >= 1, or a ratio of the total steps in (0, 1)."""
    return _number(v) and (0 < v < 1 or (v >= 1 and float(v).is_integer()))


STEPS = "an integer >= 1 (or a ratio of the run's steps in (0, 1))"

# (option, test, valid values in words); None passes for options that default to None.
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    # data
    ("max_samples", at_least(1), "an integer >= 1 (omit it for every row)"),
    ("max_source_length", at_least(1), "an integer >= 1 (prompt tokens)"),
    ("max_target_length", at_least(1), "an integer >= 1 (response tokens)"),
    ("preprocessing_num_workers", at_least(1), "an integer >= 1"),
    # methods
    ("lora_rank", at_least(1), "an integer >= 1"),
    ("lora_alpha", positive, "a number > 0"),
    ("lora_dropout", fraction, "a number in [0, 1)"),
    ("pre_seq_len", at_least(1), "an integer >= 1"),
    ("num_layer_trainable", lambda v: isinstance(v, int) and v != 0,
     "a non-zero integer (n > 0: the last n layers, n < 0: the first -n)"),
    # generation
    ("top_k", at_least(0), "an integer >= 0 (0: no top-k)"),
    ("num_beams", at_least(1), "an integer >= 1"),
    ("max_new_tokens", at_least(1), "an integer >= 1"),
    ("max_length", at_least(1), "an integer >= 1"),
    ("repetition_penalty", positive, "a number > 0 (1.0 = none)"),
    ("max_generate_samples", at_least(1), "an integer >= 1"),
    ("generation_batch_tokens", at_least(0), "an integer >= 0 (0: --per_device_eval_batch_size prompts per batch)"),
    ("likelihood_topk", at_least(1), "an integer >= 1"),
    # HF training fields users set most
    ("per_device_train_batch_size", at_least(1), "an integer >= 1"),
    ("per_device_eval_batch_size", at_least(1), "an integer >= 1"),
    ("gradient_accumulation_steps", at_least(1), "an integer >= 1"),
    ("eval_accumulation_steps", at_least(1), "an integer >= 1"),
    ("learning_rate", non_negative, "a finite number >= 0 (0: the weights do not move)"),
    ("num_train_epochs", non_negative, "a finite number > 0"),
    ("max_steps", lambda v: isinstance(v, int) and (v == -1 or v >= 1),
     "an integer >= 1, or -1 to train --num_train_epochs epochs"),
    ("logging_steps", steps, STEPS),
    ("save_steps", steps, STEPS + "; --save_strategy no saves no checkpoints"),
    ("eval_steps", steps, STEPS),
    ("warmup_steps", non_negative, "a number >= 0 (< 1: a ratio of the run's steps)"),
    ("weight_decay", non_negative, "a finite number >= 0"),
    ("max_grad_norm", non_negative, "a finite number >= 0 (0: no clipping)"),
    ("adam_beta1", fraction, "a number in [0, 1)"),
    ("adam_beta2", fraction, "a number in [0, 1)"),
    ("adam_epsilon", positive, "a finite number > 0"),
    ("label_smoothing_factor", fraction, "a number in [0, 1)"),
    ("seed", lambda v: isinstance(v, int) and 0 <= v < 2 ** 32, "an integer in [0, 2**32)"),
    ("data_seed", lambda v: isinstance(v, int) and 0 <= v < 2 ** 32, "an integer in [0, 2**32)"),
    ("dataloader_num_workers", at_least(0), "an integer >= 0"),
    ("generation_max_length", at_least(1), "an integer >= 1"),
    ("generation_num_beams", at_least(1), "an integer >= 1"),
)

SAMPLING_RULES = (  # checked when --do_sample is on (greedy decoding ignores them)
    ("temperature", positive, "a number > 0 when sampling (--do_sample false for greedy decoding)"),
    ("top_p", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
)


def _error(name: str, value: Any, valid: str) -> TunelabError:
    return TunelabError(f"--{name} must be {valid} (got {value!r})")


def validate(values: Mapping[str, Any]) -> None:
    """Raise a TunelabError for the first option outside its range (rules above; options absent from
    `values` or left at None are not checked), then for option combinations that make no sense."""
    rules = RULES + (SAMPLING_RULES if values.get("do_sample") else ())
    for name, test, valid in rules:
        value = values.get(name)
        if value is not None and not test(value):
            raise _error(name, value, valid)
    _check_template(values.get("template"))
    _check_train_length(values)


def _check_template(name: str | None) -> None:
    from tunelab.templates import TEMPLATES

    if name is not None and name not in TEMPLATES:
        from tunelab.errors import closest

        raise TunelabError(f"unknown template '{name}' (--template): {closest(name, list(TEMPLATES))}")


def _check_train_length(values: Mapping[str, Any]) -> None:
    """Training that would make no optimizer step is an error, not a run that exits 0 as if it had trained."""
    if not values.get("do_train") or (values.get("max_steps") or -1) > 0:
        return
    if values.get("num_train_epochs") == 0:
        raise TunelabError("--num_train_epochs 0 trains nothing (0 optimizer steps): give a number > 0 "
                           "or --max_steps >= 1")


# ---- checks that read the file system (before the model loads) ----

def check_inputs(args: Args, stage: str) -> None:
    """What can be known about a run's inputs without the model: the output folder can be written, the
    --checkpoint_dir checkpoints are whole and fit the model (methods/fit.py), the data sets resolve, open
    and parse (unknown names, missing files, bad encodings, malformed rows), and for training the method's
    targets and layers exist in the model (check_method_targets)."""
    check_output_dir(Path(args.training.output_dir))
    from tunelab.data import load_examples
    from tunelab.methods import split_checkpoints
    from tunelab.methods.fit import check_checkpoints

    check_checkpoints(args.model, split_checkpoints(args.model.checkpoint_dir))  # complete, and fit the model
    load_examples(args.data)
    if stage == "train":
        check_method_targets(args)


def check_output_dir(out: Path) -> None:
    """--output_dir must be a folder (or not exist yet) below a folder this process can write into."""
    if out.exists() and not out.is_dir():
        raise TunelabError(f"--output_dir {out} is an existing file, not a folder: give a folder path")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise TunelabError(f"--output_dir {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TunelabError(f"--output_dir {out}: no permission to write in {existing}")


def check_method_targets(args: Args) -> None:
    """Prepare the method on a weightless copy of the base model (built on the meta device from its
    config.json, so no weights are read): an unknown --lora_target, a layer outside the model or a bad
    --num_layer_trainable fails in a fraction of a second instead of after the model loaded. Only
    TunelabErrors count: whatever else a weightless model cannot do (P-Tuning's prefix set-up reads values)
    is left to the real run. Models with their own code are skipped (building one runs that code)."""
    import logging

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab import methods
    from tunelab.model import resolve_model_path

    if args.model.trust_remote_code or (args.model.checkpoint_dir and not args.model.model_name_or_path):
        return
    config = AutoConfig.from_pretrained(resolve_model_path(args.model.model_name_or_path), local_files_only=True)
    try:
        with torch.device("meta"):
            methods.prepare_model(AutoModelForCausalLM.from_config(config), args.finetune)
    except TunelabError:
        raise
    except Exception as err:  # noqa: BLE001  (the real preparation reports it, with the weights loaded)
        logging.getLogger(__name__).debug("weightless method check skipped: %s", err)


# ---- --eval_likelihood (issue 16; the measures are scored in tunelab/eval_likelihood.py) ----

LIKELIHOOD_MEASURES = ("nll", "kl")


def parse_measures(value: str | None) -> tuple[str, ...]:
    """'nll,kl' -> ("nll", "kl"); None or '' -> (); an unknown name fails naming the valid ones."""
    from tunelab.errors import closest

    names = tuple(dict.fromkeys(n.strip() for n in (value or "").split(",") if n.strip()))
    for name in names:
        if name not in LIKELIHOOD_MEASURES:
            valid = closest(name, list(LIKELIHOOD_MEASURES))
            raise TunelabError(f"unknown --eval_likelihood measure '{name}': {valid}")
    return names


def measure_of(metric: str | None) -> str | None:
    """The likelihood measure a --metric_for_best_model name refers to ('eval_kl_sample_mean' -> 'kl'), else None."""
    name = (metric or "").removeprefix("eval_")
    return next((m for m in LIKELIHOOD_MEASURES if name == m or name.startswith(f"{m}_")), None)


def check_eval_likelihood(value: str | None, do_train: bool, do_eval: bool, metric_for_best_model: str | None) -> None:
    """Before anything loads: --eval_likelihood names known measures and comes with evaluations during training;
    a --metric_for_best_model on a likelihood measure needs that measure scored."""
    measures = parse_measures(value)
    if measures and not (do_train and do_eval):
        raise TunelabError("--eval_likelihood scores the evaluations during training: give it with --do_train "
                           "--do_eval and --val_size or --eval_dataset (tunelab eval scores nll and kl always)")
    wanted = measure_of(metric_for_best_model)
    if wanted and wanted not in measures:
        raise TunelabError(f"--metric_for_best_model {metric_for_best_model} is measured only with "
                           f"--eval_likelihood {','.join([*measures, wanted])}")
