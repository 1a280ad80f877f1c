"""The shared training loop's pieces: the supervised-position loss equals the plain full-logits loss,
and pickle-free optimizer state round-trips exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.trainer import _flatten_optimizer_state, _unflatten_optimizer_state, supervised_loss


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100          # prompt masked
    labels[2, 9:] = -100          # right padding of the last row
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "glm"])
def test_supervised_loss_equals_full_logits_loss(tiny_model_factory, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch)).eval()
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        ours = supervised_loss(model, batch)
        plain = model(**batch).loss  # HF's own shifted CE over all positions
    assert torch.allclose(ours, plain, atol=1e-5), (ours, plain)


def test_supervised_loss_empty_batch_is_zero(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    batch = _batch(model.config.vocab_size)
    batch["labels"][:] = -100
    loss = supervised_loss(model, batch)
    assert loss.item() == 0.0 and loss.requires_grad


def test_optimizer_state_round_trip():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
    state = opt.state_dict()
    tensors, skeleton = _flatten_optimizer_state(state)
    import json

    skeleton = json.loads(json.dumps(skeleton))  # must survive JSON
    restored = _unflatten_optimizer_state(tensors, skeleton)
    opt2 = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(restored)
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            assert torch.equal(torch.as_tensor(opt2.state_dict()["state"][pid][key]), torch.as_tensor(value))
