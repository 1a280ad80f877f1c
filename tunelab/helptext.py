"""`tunelab <command> --help`, printed from the option dataclasses without importing transformers or torch.

    tunelab train --help        # tunelab's options by topic, then the usual HF training flags by name (< 1 s)
    tunelab train --help-all    # ... and every HF Seq2SeqTrainingArguments field with its help (imports transformers)

The parser that reads the flags is HfArgumentParser over the same dataclasses (tunelab/hparams.py); this
module only renders their names, defaults, choices and help, grouped: the command's own options, model,
data, method, generation, run — then the HF training fields under one heading. Rendering with argparse keeps
the look of every other command's help. What --help costs is a bench figure (bench/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
from typing import Any, Iterable

from tunelab.cli import Parser

# heading of each option dataclass; any other dataclass is headed by its name less "Arguments"
TITLES = {
    "ModelArguments": "model",
    "DataArguments": "data",
    "FinetuningArguments": "method (--finetuning_type and the options of each method)",
    "GenerationArguments": "generation (eval, predict, chat, serve)",
    "RunArguments": "run",
}
TRAINING_TITLE = "training (transformers' Seq2SeqTrainingArguments)"

# The HF training flags a tunelab run uses most, named in plain --help (their help needs transformers).
COMMON_TRAINING = (
    "do_train", "do_eval", "do_predict", "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "max_grad_norm", "logging_steps", "save_steps", "save_total_limit", "seed", "bf16", "fp16",
    "gradient_checkpointing", "resume_from_checkpoint", "predict_with_generate", "deepspeed", "disable_tqdm")


def _title(cls: type) -> str:
    if cls.__name__ in TITLES:
        return TITLES[cls.__name__]
    if issubclass(cls, _training_class() or ()):
        return TRAINING_TITLE
    return cls.__name__.removesuffix("Arguments").lower() or cls.__name__


def _training_class():
    """HF's TrainingArguments when transformers is already imported, else None (never imports it)."""
    import sys

    module = sys.modules.get("transformers.training_args")
    return getattr(module, "TrainingArguments", None)


def _metavar(field: dataclasses.Field) -> str:
    """BOOL / INT / FLOAT / TEXT from the field's type (a string under `from __future__ import annotations`)."""
    type_name = field.type if isinstance(field.type, str) else str(getattr(field.type, "__name__", field.type))
    for name, label in (("bool", "BOOL"), ("int", "INT"), ("float", "FLOAT"), ("str", "TEXT")):
        if re.search(rf"\b{name}\b", type_name):
            return label
    return "VALUE"


def _help(field: dataclasses.Field) -> str:
    text = str(field.metadata.get("help", "")).replace("%", "%%")  # argparse formats help with %
    default = field.default
    if default is not dataclasses.MISSING and default is not None and default != "":
        text += f" (default: {getattr(default, 'value', default)})"  # enums show their value
    return text


def _add_fields(group: argparse._ArgumentGroup, cls: type) -> None:
    for field in dataclasses.fields(cls):
        if not field.init or field.name.startswith("_"):
            continue
        kwargs: dict[str, Any] = {"help": _help(field), "metavar": _metavar(field)}
        choices = field.metadata.get("choices")
        if choices:
            kwargs["metavar"] = "{" + ",".join(str(c) for c in choices) + "}"
        flags = [f"--{field.name}"]
        if kwargs["metavar"] == "BOOL":
            kwargs["nargs"] = "?"
            if field.default is True:  # HfArgumentParser's negative form of a flag that is on by default
                flags.append(f"--no_{field.name}")
        group.add_argument(*flags, dest=f"{cls.__name__}.{field.name}", **kwargs)


def render(prog: str, groups: Iterable[Any], description: str | None = None) -> str:
    """The help of `prog` over option `groups`: dataclasses, and `hparams.TRAINING` standing for HF's training
    fields without loading them (the usual ones are named, with a pointer to --help-all). Groups print in the
    order given, training last."""
    groups = list(groups)
    training = [g for g in groups if isinstance(g, str) or _title(g) == TRAINING_TITLE]
    parser = Parser(prog=prog, description=description, add_help=False,
                    usage=f"{prog} [config.yaml] [--option value ...]",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    own = parser.add_argument_group("help")
    own.add_argument("-h", "--help", action="store_true", help="this help (tunelab's options, by topic)")
    own.add_argument("--help-all", action="store_true", help="also every HF training field with its help")
    for cls in (g for g in groups if g not in training):
        _add_fields(parser.add_argument_group(_title(cls)), cls)
    for cls in training:
        if isinstance(cls, str):
            names = textwrap.fill("the usual ones: " + " ".join(f"--{n}" for n in COMMON_TRAINING), width=76,
                                  subsequent_indent="  ")
            parser.add_argument_group(TRAINING_TITLE, f"{names}\n`{prog} --help-all` lists every one with its help.")
        else:
            _add_fields(parser.add_argument_group(TRAINING_TITLE), cls)
    return parser.format_help()


def print_help(prog: str, groups: Iterable[Any], description: str | None = None) -> None:
    print(render(prog, groups, description), end="")
