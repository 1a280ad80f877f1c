"""Methods as model-preparation steps: what each trains (analytic counts), and save/load round trips."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.hparams import FinetuningArguments, TunelabError
from tunelab.methods import count_params, load_checkpoints, prepare_model, save_trainable


def _load(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _ids(model):
    return torch.arange(2, 14).unsqueeze(0) % model.config.vocab_size


def test_lora_counts_match_analytic(tiny_model_factory):
    model = _load(tiny_model_factory("llama", 4))
    ft = FinetuningArguments(finetuning_type="lora", lora_target="qkv", target_layers="last:2", lora_rank=4)
    model, info = prepare_model(model, ft)
    cfg = model.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = 4 * (cfg.hidden_size + cfg.hidden_size) + 2 * 4 * (cfg.hidden_size + kv)  # q, k, v: r*(in+out)
    assert info.trainable_params == 2 * per_layer
    assert info.layers == [2, 3]
    assert "trainable params: " in info.summary() and "trainable%" in info.summary()


def test_seed_lora_target_on_any_architecture(tiny_model_factory):
    model = _load(tiny_model_factory("gpt2", 4))
    ft = FinetuningArguments(finetuning_type="lora", lora_target="2.attention.query_key_value,3.attention.query_key_value")
    _, info = prepare_model(model, ft)
    assert info.modules == ["transformer.h.2.attn.c_attn", "transformer.h.3.attn.c_attn"]


def test_freeze_trains_only_selected_modules(tiny_model_factory):
    model = _load(tiny_model_factory("llama", 4))
    model, info = prepare_model(model, FinetuningArguments(finetuning_type="freeze", num_layer_trainable=-1,
                                                            name_module_trainable="mlp"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.0.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
    assert info.layers == [0]
    assert info.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_full_and_none(tiny_llama_dir):
    model, info = prepare_model(_load(tiny_llama_dir), FinetuningArguments(finetuning_type="full"))
    assert info.trainable_params == info.all_params == count_params(model)[1]
    _, info = prepare_model(_load(tiny_llama_dir), FinetuningArguments(finetuning_type="none"))
    assert info.trainable_params == 0


def test_p_tuning_counts(tiny_llama_dir):
    model, info = prepare_model(_load(tiny_llama_dir), FinetuningArguments(finetuning_type="p_tuning", pre_seq_len=5))
    cfg = model.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert info.trainable_params == 5 * cfg.num_hidden_layers * 2 * kv


def test_unknown_method_names_valid_ones(tiny_llama_dir):
    with pytest.raises(TunelabError, match="lora, freeze, p_tuning, full, none"):
        prepare_model(_load(tiny_llama_dir), FinetuningArguments(finetuning_type="adapter"))


@pytest.mark.parametrize("method", ["lora", "freeze", "p_tuning", "full"])
def test_save_then_load_gives_same_logits(tiny_llama_dir, tmp_path, method):
    model, info = prepare_model(_load(tiny_llama_dir), FinetuningArguments(finetuning_type=method, lora_target="all"))
    with torch.no_grad():  # move the trainable weights away from their init so the round trip means something
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        want = model.eval()(input_ids=_ids(model)).logits
    save_trainable(model, tmp_path, info, base_model=str(tiny_llama_dir))
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    base = _load(tmp_path if method == "full" else tiny_llama_dir)
    loaded, meta = load_checkpoints(base, [str(tmp_path)], merge=True)
    assert meta["finetuning_type"] == method
    with torch.no_grad():
        got = loaded.eval()(input_ids=_ids(loaded)).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "freeze", "p_tuning"])
def test_save_from_a_gathered_state_dict_matches(tiny_llama_dir, tmp_path, method):
    """ZeRO-3 / FSDP hand _save the gathered full state_dict: the files must equal a plain save."""
    from safetensors.torch import load_file

    model, info = prepare_model(_load(tiny_llama_dir), FinetuningArguments(finetuning_type=method, lora_target="all"))
    save_trainable(model, tmp_path / "plain", info, base_model=str(tiny_llama_dir))
    save_trainable(model, tmp_path / "gathered", info, base_model=str(tiny_llama_dir), state_dict=model.state_dict())
    for f in (tmp_path / "plain").glob("*.safetensors"):
        a, b = load_file(str(f)), load_file(str(tmp_path / "gathered" / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
