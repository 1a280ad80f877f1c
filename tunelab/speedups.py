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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


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
    """nn.Dropout(p) with its mask drawn from 16-bit random lanes (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.levels = round(p * LANE_LEVELS)  # p as a multiple of 2^-16

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
def cpu_dropout(model: nn.Module, device: torch.device | str) -> Iterator[int]:
    """Within the block every nn.Dropout of `model` with p > 0 is a `Dropout` when `device` is a CPU;
    yields how many were swapped. The original modules are put back when the block ends."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if torch.device(device).type == "cpu":
        for parent in model.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Dropout and child.p > 0:
                    swapped.append((parent, name, child))
    for parent, name, child in swapped:
        replacement = Dropout(child.p)
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

