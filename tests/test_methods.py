"""Methods as model-preparation steps: what each trains (analytic counts), the registry (lookups, errors,
one record per method), every registered method's prepare -> save -> load -> restore round trip, and a
method added in a test alone (IA3 through peft) working end to end."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab import methods
from tunelab.hparams import FinetuningArguments, TunelabError, parse_args
from tunelab.methods import (REGISTRY, Method, MethodInfo, base_model_for, count_params, get_method, load_checkpoints,
                             method_names, prepare_model, read_method, register_method, restore_trainable,
                             save_trainable)
from tunelab.methods import lora as lora_method


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



# ---- the registry ----

VALID = ", ".join(REGISTRY)  # "lora, freeze, p_tuning, full, none"


def test_registry_holds_the_2023_methods_in_help_order():
    assert method_names() == ("lora", "freeze", "p_tuning", "full", "none")
    assert method_names(lambda m: m.trains) == ("lora", "freeze", "p_tuning", "full")
    assert [m.name for m in REGISTRY.values() if m.whole_model] == ["full"]
    assert [m.name for m in REGISTRY.values() if m.merge is None] == ["p_tuning"]  # export refuses it
    assert all(get_method(name).name == name for name in REGISTRY)


def test_the_flag_takes_every_registered_method_and_only_those():
    for name in REGISTRY:
        assert parse_args(["--finetuning_type", name]).finetune.finetuning_type == name
    with pytest.raises(TunelabError, match="invalid choice: 'adapter'"):
        parse_args(["--finetuning_type", "adapter"])


def test_each_method_reads_only_real_options():
    fields = {f.name for f in dataclasses.fields(FinetuningArguments)}
    for method in REGISTRY.values():
        assert set(method.options) <= fields, method.name
        assert method.help and method.label


def test_unknown_method_names_valid_ones(tiny_llama_dir):
    with pytest.raises(TunelabError, match=f"unknown finetuning_type 'adapter': valid: {VALID}"):
        get_method("adapter")
    with pytest.raises(TunelabError, match="lora, freeze, p_tuning, full, none"):
        prepare_model(_load(tiny_llama_dir), FinetuningArguments(finetuning_type="adapter"))
    with pytest.raises(TunelabError, match=f"unknown finetuning_type 'adapter': valid: {VALID}"):
        save_trainable(_load(tiny_llama_dir), "/nonexistent/never-written", MethodInfo("adapter"), base_model="x")


def test_a_checkpoint_of_an_unknown_method_fails_everywhere(tiny_llama_dir, tmp_path):
    (tmp_path / "tunelab_method.json").write_text(json.dumps({"finetuning_type": "adapter", "base_model": "b"}))
    meta, model = read_method(tmp_path), _load(tiny_llama_dir)
    where = f"unknown finetuning_type 'adapter' in checkpoint {tmp_path}: valid: {VALID}"
    for attempt in (lambda: load_checkpoints(model, [str(tmp_path)]), lambda: restore_trainable(model, tmp_path, meta),
                    lambda: base_model_for([str(tmp_path)]), lambda: methods.load_trainable(model, tmp_path, meta)):
        with pytest.raises(TunelabError, match=where):
            attempt()


def test_a_name_registers_once_and_records_are_checked():
    with pytest.raises(TunelabError, match="already registered"):
        register_method(REGISTRY["lora"], dict(REGISTRY))
    with pytest.raises(TunelabError, match="weight files"):  # a method that trains must say what it saves
        dataclasses.replace(REGISTRY["lora"], name="lora2", weight_files=())
    with pytest.raises(TunelabError, match="plain identifier"):
        dataclasses.replace(REGISTRY["lora"], name="lo ra")


def test_a_method_that_trains_cannot_save_a_checkpoint_without_weights(tiny_llama_dir, tmp_path, monkeypatch):
    forgetful = dataclasses.replace(REGISTRY["freeze"], name="forgetful", save=lambda model, out, state_dict: None)
    monkeypatch.setattr(methods, "REGISTRY", dict(REGISTRY))
    register_method(forgetful)
    model, info = prepare_model(_load(tiny_llama_dir), FinetuningArguments(finetuning_type="forgetful"))
    with pytest.raises(TunelabError, match="'forgetful' saved no weights .* freeze_weights.safetensors"):
        save_trainable(model, tmp_path, info, base_model=str(tiny_llama_dir))
    assert not (tmp_path / "tunelab_method.json").exists()


# ---- every method: prepare -> save -> load (merged) -> restore (resume) ----

def _nudge_trainable(model):
    """Move the trainable weights away from their init, so a round trip that loses them shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=_ids(model)).logits


def round_trip(name, base_dir, out, **options):
    """Save a nudged prepared model, then check that loading (merged, on a fresh base) and restoring (into a
    freshly prepared model, as resume does) both give its logits back."""
    ft = FinetuningArguments(finetuning_type=name, **options)
    model, info = prepare_model(_load(base_dir), ft)
    _nudge_trainable(model)
    want = _logits(model)
    save_trainable(model, out, info, base_model=str(base_dir))
    method = get_method(name)
    assert any((out / f).is_file() for f in method.weight_files) or not method.trains
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert read_method(out)["finetuning_type"] == name and base_model_for([str(out)]) in (str(base_dir), str(out))
    loaded, meta = load_checkpoints(_load(base_model_for([str(out)])), [str(out)], merge=True)
    assert meta["finetuning_type"] == name
    torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=1e-5)
    fresh, _ = prepare_model(_load(base_dir), ft)
    if method.trains:  # the fresh model differs until its weights are restored
        assert (_logits(fresh) - want).abs().max() > 1e-4
    restore_trainable(fresh, out, meta)
    torch.testing.assert_close(_logits(fresh), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", method_names())
def test_every_registered_method_round_trips(tiny_llama_dir, tmp_path, method):
    round_trip(method, tiny_llama_dir, tmp_path / "ckpt", lora_target="all")


@pytest.mark.parametrize("method", method_names(lambda m: m.trains and not m.whole_model))
def test_save_from_a_gathered_state_dict_matches(tiny_llama_dir, tmp_path, method):
    """ZeRO-3 / FSDP hand _save the gathered full state_dict: the files must equal a plain save."""
    from safetensors.torch import load_file

    model, info = prepare_model(_load(tiny_llama_dir), FinetuningArguments(finetuning_type=method, lora_target="all"))
    save_trainable(model, tmp_path / "plain", info, base_model=str(tiny_llama_dir))
    save_trainable(model, tmp_path / "gathered", info, base_model=str(tiny_llama_dir), state_dict=model.state_dict())
    for f in (tmp_path / "plain").glob("*.safetensors"):
        a, b = load_file(str(f)), load_file(str(tmp_path / "gathered" / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- adding a method is one record: IA3 (peft), written here and nowhere else ----

def prepare_ia3(model, ft):
    from peft import IA3Config, get_peft_model

    names = ["k_proj", "v_proj", "down_proj"]
    model = get_peft_model(model, IA3Config(target_modules=names, feedforward_modules=["down_proj"],
                                            task_type="CAUSAL_LM"))
    return model, MethodInfo("ia3", names, list(range(model.config.num_hidden_layers)))


IA3 = Method(name="ia3", label="IA3", help="learned scaling vectors on k, v and the MLP output (peft)", options=(),
             prepare=prepare_ia3, save=lora_method.save, load=lora_method.load, restore=lora_method.restore,
             merge=lora_method.merge, trains=True, weight_files=lora_method.METHOD.weight_files)


def test_a_new_method_is_one_registered_record(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "REGISTRY", dict(REGISTRY))  # a registry copy: the package's table is untouched
    register_method(IA3)
    assert "ia3" in method_names(lambda m: m.trains)
    round_trip("ia3", tiny_llama_dir, tmp_path / "ckpt")
    cfg = _load(tiny_llama_dir).config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    want = cfg.num_hidden_layers * (2 * kv + cfg.intermediate_size)  # a scale per k/v output, per down_proj input
    assert json.loads((tmp_path / "ckpt" / "tunelab_method.json").read_text())["trainable_params"] == want


def test_a_lora_adapter_names_the_bases_hub_id_and_tunelab_keeps_the_local_path(tiny_llama_dir, tmp_path):
    """adapter_config.json's base_model_name_or_path is the Hub id the base's config records (so peft loads
    the adapter on another machine with that base); tunelab_method.json keeps the local folder it loads."""
    import shutil

    from peft import PeftModel

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "some-org/tiny-llama"}))
    model, info = prepare_model(_load(base), FinetuningArguments(finetuning_type="lora", lora_target="qkv"))
    save_trainable(model, tmp_path / "ckpt", info, str(base))
    assert json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "some-org/tiny-llama"
    assert read_method(tmp_path / "ckpt")["base_model"] == str(base) == base_model_for([str(tmp_path / "ckpt")])
    loaded = PeftModel.from_pretrained(_load(base), str(tmp_path / "ckpt"))
    assert loaded.peft_config["default"].base_model_name_or_path == "some-org/tiny-llama"
    # a base with no Hub id known keeps peft's own record, the local path
    model, info = prepare_model(_load(tiny_llama_dir), FinetuningArguments(finetuning_type="lora", lora_target="qkv"))
    save_trainable(model, tmp_path / "plain", info, str(tiny_llama_dir))
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_llama_dir)
