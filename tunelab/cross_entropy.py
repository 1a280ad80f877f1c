"""Mean cross-entropy over a (positions, vocab) logits matrix without its full-size fp32 copies.

`F.cross_entropy(logits.float(), targets)` on bf16 logits materialises a fp32 copy of the logits, a fp32
log-softmax, a zero-filled fp32 gradient for the nll, a fp32 log-softmax gradient and its bf16 cast: for
SmolLM2's 49k vocabulary and ~1100 supervised positions, five 100-220 MB buffers per step (with a 152k
vocabulary, ~0.7 GB each). `cross_entropy` computes the same numbers in row chunks of ~4 MB fp32 that stay
in cache: the forward keeps only each chunk's target log-probability, the backward recomputes each chunk's
softmax in fp32, subtracts one at the target, scales by the upstream gradient / n and writes the result
straight into a gradient of the logits' own dtype. Same math as autograd's path (fp32 softmax, one
rounding to the logits' dtype at the end), so losses and gradients agree up to fp32 rounding
(tests/test_cross_entropy.py). Measured on LoRA q,v all layers (bench/README.md): the same step time,
~220 MB less peak RSS.

Only on CPUs: an accelerator runs F.cross_entropy's fused kernels, where a Python loop of chunks would add
launches (Liger-style fused kernels are the GPU answer to the memory side).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 20  # fp32 elements per chunk: 4 MB, a cache-sized block of rows


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log softmax(logits)[target], in fp32 (logits: [n, vocab], targets: [n], all valid)."""
    if logits.device.type != "cpu":
        return F.cross_entropy(logits.float(), targets)
    rows = max(1, CHUNK_ELEMENTS // logits.shape[-1])
    return _ChunkedCrossEntropy.apply(logits, targets, rows)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        picked = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            log_probs = torch.log_softmax(logits[start:start + rows], dim=-1, dtype=torch.float32)
            picked[start:start + rows] = log_probs.gather(1, targets[start:start + rows, None]).squeeze(1)
        ctx.save_for_backward(logits, targets)
        ctx.rows = rows
        return -picked.mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets = ctx.saved_tensors
        n = logits.shape[0]
        scale = grad_loss.float() / n
        grad = torch.empty_like(logits)
        for start in range(0, n, ctx.rows):
            stop = min(start + ctx.rows, n)
            probs = torch.softmax(logits[start:stop], dim=-1, dtype=torch.float32)
            probs[torch.arange(stop - start, device=logits.device), targets[start:stop]] -= 1
            grad[start:stop] = probs.mul_(scale)
        return grad, None, None
