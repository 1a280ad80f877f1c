"""Substitutions that make training and generation faster without changing what is computed.

`linear_weights_cast`: hold nn.Linear weights in the autocast dtype for a whole block instead of re-casting
them at every call. Under autocast, `F.linear(x, W)` with an fp32 W casts W to bf16/fp16 at *every* call. Autocast keeps a cast
only for leaf tensors that require grad, so frozen weights (LoRA's base layers, Freeze's lower layers,
the whole model under P-Tuning, every weight while generating) are read in fp32 and written as a fresh
low-precision copy in every forward — and in every decode step. Casting them once gives the same numbers
(autocast would cast these exact tensors the same way; backward through a frozen weight uses that cast
copy either way), so this is a pure speed-up: tests/test_speedups.py checks equal logits, losses and
gradients, bench/README.md has the figures.

Only plain `nn.Linear` modules are touched (not embeddings or norms, which autocast leaves in fp32;
not quantized or custom linears). A tied output projection gets its own low-precision copy for the
block, the embedding keeps its fp32 weight. The original parameters are put back when the block ends.

`cpu_dropout`: on a CPU, every `nn.Dropout` (LoRA's dropout is one per adapted module) draws its mask from
16-bit random lanes, four per 64-bit draw of torch's generator, instead of `bernoulli_` (one slow draw per
element): an element is kept when its lane is at or above p * 2^16 of the 2^16 levels, so the keep mask is
Bernoulli(1 - p') with p' = p rounded to a multiple of 2^-16 (0.1 -> 0.1000061; torch.rand's fp32 draw
itself resolves p only to 2^-24), and kept values are scaled by 1 / (1 - p'), so the expected output is the
input exactly, as with nn.Dropout. A seeded run draws other, equally distributed masks than nn.Dropout
would; the mask kept for backward is a bool tensor (1 byte per element, not 4). On LoRA q,v over all
layers of SmolLM2 a forward + backward is 9% faster than with nn.Dropout and 2% faster than with a
torch.rand mask per element (bench/README.md). GPUs keep nn.Dropout (one fused kernel there).

`SpeedupOptions`: which of tunelab's training speed-ups are on (all of them by default). The trainer, the
packed attention (tunelab/attention.py) and the context managers here take their switches from it as
arguments, so bench/ measures a speed-up by passing options with that one switch off, never by rebinding
a module's globals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

DROPOUT_MASKS = ("lanes", "rand", "torch")


@dataclass(frozen=True)
class SpeedupOptions:
    """Switches of tunelab's training speed-ups; the defaults are what every run uses. Each switch changes
    speed or memory, not what is computed (up to float rounding; for dropout, which masks a seed draws)."""

    packing: bool = True  # padded batches run as one padding-free row (attention.pack_batch)
    pack_dense: bool = True  # on a CPU, batches without padding too when their rows fit the matmul attention
    matmul_attention: bool = True  # on a CPU, packed samples up to matmul_max_len tokens skip SDPA's kernel
    matmul_max_len: int = 256  # longer samples go through SDPA (memory O(L), not O(L^2)), see attention.py
    matmul_decode: bool = True  # on a CPU, a decoding step's attention as two matmuls, not SDPA (attention.py)
    group_equal_lengths: bool = True  # one attention call per run of equal-length samples, not one per sample
    # the matmul attention's softmax dtype; None: the scores' own dtype — for bf16/fp16 scores torch's CPU kernel
    # computes in fp32 and rounds once, so the probabilities are bit-identical to transformers' fp32 softmax +
    # cast back, minus two full-size cast passes per layer; 1.05x per step on 256-token rows (bench/README.md)
    softmax_dtype: torch.dtype | None = None
    attention: Callable | None = None  # a packed attention to run instead of tunelab's (bench's earlier versions)
    supervised_logits: bool = True  # logits only at supervised positions (else HF's model(labels=...) loss)
    chunked_cross_entropy: bool = True  # tunelab.cross_entropy's chunks on a CPU (else F.cross_entropy in fp32)
    cast_frozen_weights: bool = True  # frozen nn.Linear weights held in the autocast dtype (linear_weights_cast)
    # CPU dropout masks: "lanes" (16-bit lanes, cpu_dropout), "rand" (one torch.rand draw per element), "torch"
    # (nn.Dropout's own bernoulli_)
    dropout_masks: str = "lanes"

    def __post_init__(self):
        if self.dropout_masks not in DROPOUT_MASKS:
            raise ValueError(f"dropout_masks {self.dropout_masks!r}: choose one of {', '.join(DROPOUT_MASKS)}")


@contextlib.contextmanager
def linear_weights_cast(model: nn.Module, dtype: torch.dtype | None, frozen_only: bool = False) -> Iterator[int]:
    """Within the block every (frozen, with frozen_only) floating nn.Linear weight and bias of `model` is a
    `dtype` copy; yields how many modules were cast. dtype None: a no-op (no autocast, nothing to save)."""
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in _castable(model, dtype, frozen_only) if dtype is not None else ():
        for name in ("weight", "bias"):
            param = getattr(module, name)
            if param is not None:
                saved.append((module, name, param))
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
    try:
        yield len({id(m) for m, _, _ in saved})
    finally:
        for module, name, param in saved:
            setattr(module, name, param)


def _castable(model: nn.Module, dtype: torch.dtype, frozen_only: bool) -> Iterator[nn.Module]:
    for module in model.modules():
        if type(module) is not nn.Linear or not module.weight.is_floating_point() or module.weight.dtype == dtype:
            continue
        params = [p for p in (module.weight, module.bias) if p is not None]
        if frozen_only and any(p.requires_grad for p in params):
            continue
        yield module


class Dropout(nn.Module):
    """nn.Dropout(p) with its mask drawn from 16-bit random lanes (see the module docstring); lanes False:
    from one fp32 torch.rand draw per element."""

    def __init__(self, p: float, lanes: bool = True):
        super().__init__()
        self.p = p
        self.levels = round(p * LANE_LEVELS) if lanes else 0  # p as a multiple of 2^-16; 0: the torch.rand path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return x * 0.0
        if not 0 < self.levels < LANE_LEVELS:  # p within 2^-17 of 0 or 1: the exact fp32 draw
            return x * torch.rand_like(x, dtype=torch.float32).ge_(self.p).div_(1 - self.p).to(x.dtype)
        keep = random_lanes(x.shape, x.device) >= self.levels - LANE_LEVELS // 2
        return (x * keep).mul_(LANE_LEVELS / (LANE_LEVELS - self.levels))

    def extra_repr(self) -> str:
        return f"p={self.p}"


LANE_LEVELS = 1 << 16


def random_lanes(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Uniform int16 values of `shape`, four per 64-bit draw of torch's generator (seeded by torch.manual_seed)."""
    count = shape.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return draws.view(torch.int16)[:count].view(shape)


@contextlib.contextmanager
def cpu_dropout(model: nn.Module, device: torch.device | str, masks: str = "lanes") -> Iterator[int]:
    """Within the block every nn.Dropout of `model` with p > 0 is a `Dropout` when `device` is a CPU and
    `masks` (SpeedupOptions.dropout_masks) is not "torch"; yields how many were swapped. The original
    modules are put back when the block ends."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if torch.device(device).type == "cpu" and masks != "torch":
        for parent in model.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Dropout and child.p > 0:
                    swapped.append((parent, name, child))
    for parent, name, child in swapped:
        replacement = Dropout(child.p, lanes=masks == "lanes")
        replacement.train(child.training)
        setattr(parent, name, replacement)
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)


def active_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype autocast casts matmuls to on `device` right now, None outside autocast."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None

