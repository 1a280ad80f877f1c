import pytest
import torch
import torch.nn.functional as F

from tunelab import cross_entropy as ce


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])  # rows per chunk 1, 2 (37 rows: a ragged last chunk), all
def test_loss_and_gradient_equal_autograds_fp32_cross_entropy(monkeypatch, dtype, chunk):
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", chunk * 31)
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(37, 31, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 31, (37,), generator=gen)
    ours_in, ref_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    ours = ce.cross_entropy(ours_in, targets)
    ref = F.cross_entropy(ref_in.float(), targets)
    (ours * 3).backward()  # an upstream gradient other than 1 (gradient accumulation, loss scaling)
    (ref * 3).backward()
    assert ours.dtype == torch.float32 and torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert ours_in.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2 * ref_in.grad.abs().max().item()  # one bf16 rounding
    assert torch.allclose(ours_in.grad.float(), ref_in.grad.float(), rtol=0, atol=tol)


def test_large_vocab_rows_are_chunked_without_changing_the_value():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 49152, generator=gen, dtype=torch.bfloat16)
    targets = torch.randint(0, 49152, (50,), generator=gen)
    assert max(1, ce.CHUNK_ELEMENTS // 49152) < 50  # more than one chunk
    assert torch.allclose(ce.cross_entropy(logits, targets), F.cross_entropy(logits.float(), targets), atol=1e-5)


def test_forward_under_no_grad_gives_the_value():
    logits = torch.randn(4, 9)
    with torch.no_grad():
        value = ce.cross_entropy(logits, torch.tensor([0, 1, 2, 8]))
    assert torch.allclose(value, F.cross_entropy(logits, torch.tensor([0, 1, 2, 8])))
