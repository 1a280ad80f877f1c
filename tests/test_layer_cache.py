"""tunelab/layer_cache.py: running only layers k.. on cached layer-k inputs equals the full model — losses,
trainable gradients and weights over several epochs (padded and packed batches, LoRA and Freeze on the last
layers, GQA), the eval loss and generation; the disk cache is shared by later runs and never used across
models, layers or precisions; every swap is put back."""

import copy
import json

import pytest
import torch

from tunelab import methods
from tunelab.hparams import TunelabError, parse_args
from tunelab.paths import cache_dir
from tunelab.layer_cache import (LayerInputStore, cached_lower_layers, decoder_of, lower_layers_fingerprint,
                                 lowest_trainable_layer, sample_segments)
from tunelab.trainer import supervised_loss

METHOD_FLAGS = {
    "lora_last2": ["--finetuning_type", "lora", "--lora_target", "qkv,mlp", "--target_layers", "last:2",
                   "--lora_dropout", "0"],
    "freeze_last2": ["--finetuning_type", "freeze", "--num_layer_trainable", "2", "--name_module_trainable", "all"],
    "lora_all": ["--finetuning_type", "lora", "--lora_target", "qkv"],
    "lora_head": ["--finetuning_type", "lora", "--lora_target", "qkv,lm_head", "--target_layers", "last:2"],
    "p_tuning": ["--finetuning_type", "p_tuning", "--pre_seq_len", "4"],
    "full": ["--finetuning_type", "full"],
    "none": ["--finetuning_type", "none"],
}


def prepared(model_dir, method: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    ft = parse_args([*METHOD_FLAGS[method], "--output_dir", "unused"]).finetune
    model, info = methods.prepare_model(model, ft)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # LoRA starts at zero: give B a value so gradients reach A too
            torch.nn.init.normal_(param, std=0.1)
    return model, info


def new_store(model, k, root="cache"):
    root = cache_dir("layer_inputs") if root == "cache" else root  # the test's own TUNELAB_CACHE (conftest)
    return LayerInputStore(lower_layers_fingerprint(decoder_of(model), k), k, root)


def batches(layout: str, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three right-padded batches of three samples each, or the same samples as packed rows [1, N]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(3):
        ids = torch.randint(3, 300, (3, 14), generator=gen)
        lengths = torch.tensor([14, 9 + b, 5])
        mask = (torch.arange(14) < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100
        if layout == "padded":
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
            continue
        keep = mask.bool()
        labels[:, 0] = -100  # a packed sample never predicts its first token from the previous sample
        positions = torch.arange(14).expand(3, 14)
        out.append({"input_ids": ids[keep][None], "labels": labels[keep][None], "position_ids": positions[keep][None]})
    return out


def train(model, data, epochs: int = 3) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """AdamW over the batches for some epochs; the loss and trainable gradients of every step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], []
    model.train()
    for _ in range(epochs):
        for batch in data:
            optimizer.zero_grad()
            loss = supervised_loss(model, batch)
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            optimizer.step()
    return losses, grads


@pytest.mark.parametrize("method, layout, arch", [
    ("lora_last2", "padded", "llama"), ("lora_last2", "packed", "llama"), ("freeze_last2", "padded", "llama"),
    ("freeze_last2", "packed", "llama"), ("lora_last2", "padded", "qwen2"), ("freeze_last2", "packed", "glm")])
def test_cached_training_equals_full_training(tiny_model_factory, method, layout, arch):
    full_model, info = prepared(tiny_model_factory(arch), method)
    cached_model = copy.deepcopy(full_model)
    k = lowest_trainable_layer(cached_model, info)
    assert k == 2
    data = batches(layout)
    full_losses, full_grads = train(full_model, data)
    with cached_lower_layers(cached_model, k, new_store(cached_model, k)) as store:
        losses, grads = train(cached_model, data)
    assert store.computed == 9 and store.reused == 18  # every sample once, then reused by epochs 2 and 3
    real_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in data)
    assert store.computed_tokens == real_tokens  # the lower layers ran over one epoch's real tokens, no padding
    assert store.records() == {"cached_layer": 2, "lower_layer_tokens": real_tokens}
    assert losses == pytest.approx(full_losses, rel=1e-5, abs=1e-6)
    assert len(grads) == len(full_grads) == 9
    for got, want in zip(grads, full_grads):
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    final = dict(full_model.named_parameters())
    for name, param in cached_model.named_parameters():
        torch.testing.assert_close(param, final[name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_still_reaches_the_trained_layers(tiny_llama_dir):
    model, info = prepared(tiny_llama_dir, "lora_last2")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    data = batches("padded")[:1]
    full_losses, full_grads = train(copy.deepcopy(model), data, epochs=1)
    with cached_lower_layers(model, 2, new_store(model, 2, root=None)):
        losses, grads = train(model, data, epochs=1)
    assert losses == pytest.approx(full_losses, rel=1e-5)
    for name, grad in full_grads[0].items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("autocast", [False, True])
def test_eval_loss_and_generation_on_cached_prefixes_equal_the_full_model(tiny_llama_dir, autocast):
    model, info = prepared(tiny_llama_dir, "lora_last2")
    model = model.merge_and_unload().eval()  # what eval holds: the checkpoint merged into the base
    meta = {"finetuning_type": "lora", "modules": info.modules}
    assert lowest_trainable_layer(model, meta) == 2
    data = batches("padded", seed=1)
    singles = [{key: value[i:i + 1] for key, value in batch.items()} for batch in data for i in range(3)]
    prompt = data[0]["input_ids"][:1, :6]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), context:
        full = [supervised_loss(model, b).item() for b in data]
        full_singles = [supervised_loss(model, b).item() for b in singles]
        full_tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
        with cached_lower_layers(model, 2, new_store(model, 2)) as store:
            first = [supervised_loss(model, b).item() for b in data]
            regrouped = [supervised_loss(model, b).item() for b in singles]  # each sample now alone, from the cache
            tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert (store.computed, store.reused) == (9, 9)
    assert store.precision == ("torch.bfloat16" if autocast else "none")
    assert first == full  # computed in the batch's own layout: the same numbers
    assert regrouped == pytest.approx(full_singles, rel=1e-3 if autocast else 1e-5)
    assert torch.equal(tokens, full_tokens)  # generation runs the full model (KV cache of every layer)


def test_disk_cache_is_shared_by_later_runs_and_keyed(tiny_llama_dir):
    model, info = prepared(tiny_llama_dir, "lora_last2")
    data = batches("padded")

    def run(m, k):
        with torch.no_grad(), cached_lower_layers(m, k, new_store(m, k)) as store:
            losses = [supervised_loss(m, b).item() for b in data]
        return store, losses

    first, losses = run(model, 2)
    second, again = run(copy.deepcopy(model), 2)  # a later run of the study
    assert (first.computed, first.read) == (9, 0)
    assert (second.computed, second.read, second.reused) == (0, 9, 9)
    assert first.computed_tokens > 0 and second.computed_tokens == 0  # read from disk: the lower layers never ran
    assert again == losses
    assert run(model, 1)[0].computed == 9  # another layer: its own entries
    other = copy.deepcopy(model)  # e.g. a merged earlier checkpoint that changed a lower layer
    with torch.no_grad():
        decoder_of(other).layers[0].mlp.down_proj.weight.add_(1e-3)
    assert run(other, 2)[0].computed == 9  # other lower-layer weights: nothing of the first model is reused


def test_a_cache_file_of_another_model_is_refused(tiny_llama_dir):
    from safetensors.torch import save_file

    model, info = prepared(tiny_llama_dir, "lora_last2")
    store = new_store(model, 2)
    store.bind("none")
    store.directory.mkdir(parents=True)
    save_file({"0" * 32: torch.zeros(3, 32)}, str(store.directory / "foreign.safetensors"),
              metadata={**store.header(), "fingerprint": "another-model"})
    with pytest.raises(TunelabError, match="another model"):
        with torch.no_grad(), cached_lower_layers(model, 2, new_store(model, 2)):
            supervised_loss(model, batches("padded")[0])


def test_every_swap_is_put_back_also_on_error(tiny_llama_dir):
    model, info = prepared(tiny_llama_dir, "freeze_last2")
    keys = list(model.state_dict())
    layers = list(decoder_of(model).layers)
    with cached_lower_layers(model, 2, new_store(model, 2, root=None)):
        assert list(model.state_dict()) == keys  # names kept inside the block too (checkpoints saved there)
        assert list(decoder_of(model).layers) != layers
    with pytest.raises(RuntimeError, match="boom"):
        with cached_lower_layers(model, 2, new_store(model, 2, root=None)):
            raise RuntimeError("boom")
    decoder = decoder_of(model)
    assert list(model.state_dict()) == keys and list(decoder.layers) == layers
    assert not decoder._forward_pre_hooks and not decoder._forward_hooks and not layers[2]._forward_pre_hooks


@pytest.mark.parametrize("method", ["lora_all", "lora_head", "p_tuning", "full", "none"])
def test_methods_that_train_the_lowest_layers_or_outside_them_are_not_cached(tiny_llama_dir, method):
    model, info = prepared(tiny_llama_dir, method)
    assert lowest_trainable_layer(model, info) is None


def test_unsupported_architectures_keep_the_full_model(tiny_model_factory):
    model, info = prepared(tiny_model_factory("gpt2"), "freeze_last2")
    assert info.layers == [2, 3] and lowest_trainable_layer(model, info) is None


def test_sample_segments_of_each_layout():
    ids = torch.arange(12).view(2, 6)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert sample_segments(ids, right, None) == [(0, 0, 4), (1, 0, 6)]
    assert sample_segments(ids, None, None) == [(0, 0, 6), (1, 0, 6)]
    assert sample_segments(ids, right.flip(1), None) is None  # left padding
    packed = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert sample_segments(ids[:1], None, packed) == [(0, 0, 3), (0, 3, 2), (0, 5, 1)]
    assert sample_segments(ids[:1], None, torch.tensor([[3, 4, 5, 0, 1, 2]])) is None  # a continuation
    assert sample_segments(ids, right, torch.arange(6).expand(2, 6)) is None


def test_train_command_with_and_without_the_cache(tiny_llama_dir, tiny_data_dir, tmp_path):
    """The whole `tunelab train` path (the trainer's packed batches, 3 epochs): same losses and weights."""
    from safetensors.torch import load_file

    from tunelab.train import run

    def train_run(name, cache):
        out = tmp_path / name
        run(parse_args(["--do_train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "tiny",
                        "--dataset_dir", str(tiny_data_dir), *METHOD_FLAGS["lora_last2"], "--output_dir", str(out),
                        "--per_device_train_batch_size", "4", "--num_train_epochs", "3", "--logging_steps", "1",
                        "--save_steps", "1000", "--learning_rate", "1e-2", "--seed", "0", "--bf16", "false",
                        "--cache_lower_layers", str(cache).lower()]))
        state = json.loads((out / "trainer_state.json").read_text())
        results.append(json.loads((out / "train_results.json").read_text()))
        return [e["loss"] for e in state["log_history"] if "loss" in e], load_file(out / "adapter_model.safetensors")

    results = []
    full_losses, full_weights = train_run("full", False)
    losses, weights = train_run("cached", True)
    # what the study's FLOP count reads: the cached layer, and the lower layers' tokens (one epoch's, not three)
    assert "train_cached_layer" not in results[0] and results[1]["train_cached_layer"] == 2
    assert 0 < results[1]["train_lower_layer_tokens"]
    assert results[0]["train_supervised_tokens"] == results[1]["train_supervised_tokens"] > 0  # the head's positions
    assert len(losses) == 12 and losses == pytest.approx(full_losses, rel=1e-4)
    assert set(weights) == set(full_weights)
    for name, value in full_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method", ["freeze_last2", "lora_last2"])
def test_eval_of_a_checkpoint_uses_the_cache_and_scores_as_the_full_model(tiny_llama_dir, tiny_data_dir, tmp_path,
                                                                         monkeypatch, method):
    """`tunelab eval` of a last-layers checkpoint runs its likelihood pass on cached layer inputs (a loaded
    Freeze checkpoint used to keep requires_grad on every weight, so the cache never applied) with the
    same scores as the full model."""
    from tunelab import layer_cache
    from tunelab.evaluate import run_eval
    from tunelab.train import run

    common = ["--model_name_or_path", str(tiny_llama_dir), "--dataset", "tiny", "--dataset_dir", str(tiny_data_dir),
              "--bf16", "false", "--seed", "0"]
    ckpt = tmp_path / "ckpt"
    run(parse_args(["--do_train", *common, *METHOD_FLAGS[method], "--output_dir", str(ckpt),
                    "--num_train_epochs", "1", "--learning_rate", "1e-2", "--save_steps", "1000"]))
    used = []
    real = layer_cache.cached_lower_layers
    monkeypatch.setattr(layer_cache, "cached_lower_layers", lambda model, k, store: used.append(k) or real(model, k, store))

    def scores(cache):
        out = tmp_path / f"eval_{cache}"
        return run_eval(parse_args(["--do_eval", *common, "--checkpoint_dir", str(ckpt), "--output_dir", str(out),
                                    "--cache_lower_layers", str(cache).lower()]), "eval")

    full = scores(False)
    assert used == []
    cached = scores(True)
    assert used == [2]  # tiny llama: 4 layers, the last 2 train
    assert "eval_cached_layer" not in full and cached["eval_cached_layer"] == 2 and cached["eval_lower_layer_tokens"] >= 0
    assert full["eval_base_pass_tokens"] == full["eval_tokens_scored"] > 0  # the base pass ran once ...
    assert cached["eval_base_pass_tokens"] == 0  # ... and the second eval read it from the cache
    assert cached["eval_nll"] == pytest.approx(full["eval_nll"], rel=1e-5)
    assert cached["eval_kl"] == pytest.approx(full["eval_kl"], rel=1e-4, abs=1e-7)
