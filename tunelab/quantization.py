"""A 4- or 8-bit frozen base through bitsandbytes (`--quantization_bit 4|8`), for QLoRA: LoRA adapters in
float32 trained on a quantized base. An edge module: it only builds transformers' `BitsAndBytesConfig` and
calls peft's `prepare_model_for_kbit_training`; bitsandbytes does the quantized matmuls.

    check_quantization(args.model)                   # before anything loads: a one-line refusal where it cannot run
    kwargs = load_kwargs(args.model, dtype)          # extra from_pretrained arguments (empty without quantization)
    model = prepare_for_training(model, gradient_checkpointing)   # before the LoRA adapters are added

bitsandbytes' quantized kernels need a CUDA GPU here (its CPU backend does not train), so on a CPU-only
machine `--quantization_bit` is refused before the model loads; `--torch_dtype bfloat16` is the way to halve
the base's memory there. In 2023 the toolkit accepted 8 bits for LoRA/Freeze (bitsandbytes `load_in_8bit`)
and 4/8 for P-Tuning (ChatGLM's own `quantize()`); tunelab quantizes any causal LM for LoRA, with 4-bit NF4
+ double quantization as in the QLoRA paper.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    import torch

    from tunelab.hparams import ModelArguments


def check_quantization(model_args: ModelArguments) -> None:
    """Refuse --quantization_bit where bitsandbytes cannot serve it: no CUDA GPU, or no bitsandbytes."""
    import torch

    bits = model_args.quantization_bit
    if bits is None:
        return
    if not torch.cuda.is_available():
        raise TunelabError(f"--quantization_bit {bits} needs a CUDA GPU (bitsandbytes' quantized kernels; none "
                           "found here): train on a GPU, or use --torch_dtype bfloat16 to halve the base's memory")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunelabError(f"--quantization_bit {bits} needs the bitsandbytes package: pip install bitsandbytes")
    if bits == 8 and _version("bitsandbytes") < (0, 48):
        # eval and chat move the loaded model to the GPU (.to), which transformers allows for 8-bit only from 0.48
        raise TunelabError(f"--quantization_bit 8 needs bitsandbytes >= 0.48 (found {_version('bitsandbytes')}): "
                           "pip install -U bitsandbytes, or use --quantization_bit 4")


def _version(package: str) -> tuple[int, ...]:
    """The installed version's leading numbers: '0.48.1' -> (0, 48, 1)."""
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version(package)).release


def compute_dtype(base: torch.dtype) -> torch.dtype:
    """The dtype 4-bit matmuls run in: the base's when 16-bit, else bf16 where the GPU has it (fp16 before)."""
    import torch

    if base in (torch.bfloat16, torch.float16):
        return base
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_kwargs(model_args: ModelArguments, base: torch.dtype) -> dict[str, Any]:
    """from_pretrained's quantization_config and device_map for --quantization_bit; {} without it. The
    quantized weights go straight to this process's GPU (LOCAL_RANK under torchrun)."""
    from transformers import BitsAndBytesConfig

    bits = model_args.quantization_bit
    if bits is None:
        return {}
    check_quantization(model_args)
    if bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute_dtype(base))
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None))


def prepare_for_training(model, gradient_checkpointing: bool):
    """peft's preparation of a quantized base for training (norms in fp32, input grads for checkpointing);
    the model as it is when it is not quantized."""
    if not is_quantized(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
