"""Tests for tunelab/targets.py: layer specs, the 2023 Freeze layer choice, target resolution (groups, ChatGLM
aliases, raw names, strict vs legacy layer prefixes), error messages and the printed tables.

Module-name lists come from real transformers architectures built on the meta device (no weights, no
network); one test builds a real 28-layer tiny Llama and checks LoRA's trainable-parameter count with peft.
Run: python -m pytest tests/test_targets.py -q
"""

from __future__ import annotations

from functools import lru_cache

import pytest

from tunelab.hparams import TunelabError
from tunelab.targets import (
    ARCH_GROUPS, arch_groups, describe_modules, format_target_table, freeze_layers, layer_of, parse_layer_spec,
    resolve_targets,
)

SEED_QKV = "25.attention.query_key_value,26.attention.query_key_value,27.attention.query_key_value"
SEED_LOW = "0.attention.query_key_value,1.attention.query_key_value,2.attention.query_key_value"
LLAMA_QKV = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
LLAMA_MLP = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
NOT_IN_TRANSFORMERS = {"chatglm", "baichuan"}  # remote-code model types: covered by hand-written name lists


@lru_cache(maxsize=None)
def leaf_names(arch: str, num_layers: int = 2) -> tuple[str, ...]:
    """Leaf Linear/Conv1D/Embedding names of a real transformers `arch`, built on the meta device (no memory)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.for_model(
        arch, num_hidden_layers=num_layers, n_layer=num_layers, hidden_size=32, n_embd=32, intermediate_size=64,
        num_attention_heads=4, n_head=4, num_key_value_heads=2, vocab_size=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    if getattr(config, "head_dim", 0) is None:  # e.g. ministral leaves head_dim unset
        config.head_dim = 8
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    kinds = (nn.Linear, Conv1D, nn.Embedding)
    return tuple(name for name, mod in model.named_modules() if name and isinstance(mod, kinds))


def resolve(arch: str, targets: str, num_layers: int = 2, **kw) -> list[str]:
    return resolve_targets(list(leaf_names(arch, num_layers)), arch, num_layers, targets, **kw)


def by_layer(names: list[str]) -> dict[int | None, set[str]]:
    """{layer: {name relative to the layer}} (full name for modules outside the layers)."""
    out: dict[int | None, set[str]] = {}
    for name in names:
        layer = layer_of(name)
        rel = name if layer is None else name.split(f".{layer}.", 1)[1]
        out.setdefault(layer, set()).add(rel)
    return out


# ---- layer_of ----

@pytest.mark.parametrize("name, layer", [
    ("model.layers.25.self_attn.q_proj", 25),
    ("transformer.h.3.attn.c_attn", 3),
    ("transformer.encoder.layers.0.self_attention.query_key_value", 0),
    ("model.layers.7", 7),
    ("lm_head", None),
    ("model.embed_tokens", None),
    ("transformer.wte", None),
])
def test_layer_of(name, layer):
    assert layer_of(name) == layer


# ---- layer specs ----

@pytest.mark.parametrize("spec, n, expected", [
    ("25-27", 28, [25, 26, 27]),
    ("0-2", 28, [0, 1, 2]),
    ("0,5,9", 28, [0, 5, 9]),
    ("first:3", 28, [0, 1, 2]),
    ("last:3", 28, [25, 26, 27]),
    ("LAST:1", 28, [27]),
    ("all", 4, [0, 1, 2, 3]),
    ("-1", 28, [27]),
    ("-3--1", 28, [25, 26, 27]),
    ("25--1", 28, [25, 26, 27]),
    ("0,25-27", 28, [0, 25, 26, 27]),
    (" 0, 1-2 ,2", 28, [0, 1, 2]),
    ("27", 28, [27]),
    ("-28", 28, [0]),
])
def test_parse_layer_spec(spec, n, expected):
    assert parse_layer_spec(spec, n) == expected


@pytest.mark.parametrize("spec, n, message", [
    ("30", 30, "layer 30 out of range: the model has 30 layers (0-29)"),
    ("28", 28, "the model has 28 layers (0-27)"),
    ("-29", 28, "the model has 28 layers"),
    ("0-40", 28, "the model has 28 layers"),
    ("first:29", 28, "the model has 28 layers"),
    ("last:0", 28, "the model has 28 layers"),
    ("3-1", 28, "empty"),
    ("x", 28, "valid forms are 25-27, 0,5,9, first:3, last:3, all"),
    ("1-", 28, "valid forms"),
    ("first3", 28, "valid forms"),
    ("1,,2", 28, "valid forms"),
    ("", 28, "valid forms"),
])
def test_parse_layer_spec_errors(spec, n, message):
    with pytest.raises(TunelabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_layer_spec(spec, n)


@pytest.mark.parametrize("n, num_layers, expected", [
    (3, 28, [25, 26, 27]),
    (-3, 28, [0, 1, 2]),
    (1, 28, [27]),
    (28, 28, list(range(28))),
    (-1, 4, [0]),
])
def test_freeze_layers(n, num_layers, expected):
    assert freeze_layers(n, num_layers) == expected


@pytest.mark.parametrize("n", [0, 29, -29])
def test_freeze_layers_errors(n):
    with pytest.raises(TunelabError, match="28 layers"):
        freeze_layers(n, 28)


# ---- the seed's strings and layer prefixes ----

@pytest.mark.parametrize("targets, mode, layers", [
    (SEED_QKV, "strict", {25, 26, 27}),
    (SEED_QKV, "legacy", {25, 26, 27}),  # no other index of 0-27 ends with 25, 26 or 27
    (SEED_LOW, "strict", {0, 1, 2}),
    (SEED_LOW, "legacy", {0, 1, 2, 10, 11, 12, 20, 21, 22}),
    ("2.qkv", "strict", {2}),  # layer 2 only, not 12 or 22
    ("2.qkv", "legacy", {2, 12, 22}),
    ("7.attention.query_key_value", "legacy", {7, 17, 27}),
])
def test_layer_prefix_on_28_layer_llama(targets, mode, layers):
    got = by_layer(resolve("llama", targets, 28, mode=mode))
    assert got == {i: LLAMA_QKV for i in layers}


def test_seed_exact_names():
    assert resolve("llama", SEED_QKV, 28) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in (25, 26, 27) for p in ("k", "q", "v")]


def test_prefix_wins_over_layers_and_layers_filter_unprefixed():
    got = by_layer(resolve("llama", "2.qkv,mlp", 28, layers=[25, 26]))
    assert got == {2: LLAMA_QKV, 25: LLAMA_MLP, 26: LLAMA_MLP}


def test_freeze_default_resolution():
    got = by_layer(resolve("llama", "mlp", 28, layers=freeze_layers(3, 28)))
    assert got == {25: LLAMA_MLP, 26: LLAMA_MLP, 27: LLAMA_MLP}


# ---- groups and aliases per architecture ----

@pytest.mark.parametrize("arch, targets, rels", [
    ("llama", "qkv", LLAMA_QKV),
    ("llama", "attn", LLAMA_QKV | {"self_attn.o_proj"}),
    ("llama", "mlp", LLAMA_MLP),
    ("llama", "all", LLAMA_QKV | {"self_attn.o_proj"} | LLAMA_MLP),
    ("qwen2", "qkv", LLAMA_QKV),
    ("qwen2", "mlp_in", {"mlp.gate_proj", "mlp.up_proj"}),
    ("qwen2", "all", LLAMA_QKV | {"self_attn.o_proj"} | LLAMA_MLP),
    ("gpt2", "qkv", {"attn.c_attn"}),  # fused q/k/v
    ("gpt2", "o", {"attn.c_proj"}),  # c_proj of attention, not of the MLP
    ("gpt2", "attn", {"attn.c_attn", "attn.c_proj"}),
    ("gpt2", "mlp", {"mlp.c_fc", "mlp.c_proj"}),
    ("gpt2", "mlp_out", {"mlp.c_proj"}),
    ("gpt2", "all", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    ("glm", "qkv", LLAMA_QKV),
    ("glm", "mlp", {"mlp.gate_up_proj", "mlp.down_proj"}),
    ("glm", "all", LLAMA_QKV | {"self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}),
    ("phi3", "qkv", {"self_attn.qkv_proj"}),
    ("phi3", "mlp_in", {"mlp.gate_up_proj"}),
    ("gpt_neox", "qkv", {"attention.query_key_value"}),
    ("gpt_neox", "o", {"attention.dense"}),
    ("opt", "mlp", {"fc1", "fc2"}),
    # ChatGLM names work everywhere
    ("llama", "query_key_value", LLAMA_QKV),
    ("llama", "attention.query_key_value", LLAMA_QKV),
    ("llama", "self_attention.query_key_value", LLAMA_QKV),
    ("llama", "dense", {"self_attn.o_proj"}),
    ("llama", "attention.dense", {"self_attn.o_proj"}),
    ("llama", "dense_h_to_4h,dense_4h_to_h", LLAMA_MLP),
    ("llama", "mlp.dense_h_to_4h", {"mlp.gate_proj", "mlp.up_proj"}),
    ("gpt2", "query_key_value", {"attn.c_attn"}),
    ("gpt2", "attention.dense", {"attn.c_proj"}),
    ("gpt2", "dense_4h_to_h", {"mlp.c_proj"}),
    ("gpt2", "mlp.dense_h_to_4h", {"mlp.c_fc"}),
    # raw names: dotted suffixes of the full name
    ("llama", "q_proj", {"self_attn.q_proj"}),
    ("llama", "self_attn.q_proj,v_proj", {"self_attn.q_proj", "self_attn.v_proj"}),
    ("gpt2", "c_proj", {"attn.c_proj", "mlp.c_proj"}),
    ("gpt2", "attn.c_proj", {"attn.c_proj"}),
])
def test_groups_aliases_raw(arch, targets, rels):
    assert by_layer(resolve(arch, targets)) == {0: rels, 1: rels}


@pytest.mark.parametrize("arch, targets, layers, expected", [
    ("llama", "lm_head", None, ["lm_head"]),
    ("llama", "lm_head", [0], ["lm_head"]),  # explicit non-layer modules ignore the layer filter
    ("llama", "embed_tokens", None, ["model.embed_tokens"]),
    ("llama", "qkv,lm_head", [1], ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
                                   "model.layers.1.self_attn.v_proj", "lm_head"]),
    ("llama", "layers.1.mlp.down_proj", [0], ["model.layers.1.mlp.down_proj"]),  # a name that pins its layer
    ("llama", "qkv,q_proj,1.q_proj", [1], ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
                                          "model.layers.1.self_attn.v_proj"]),  # unique
    ("gpt2", "wte,1.attn", None, ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.wte"]),
])
def test_explicit_names_and_order(arch, targets, layers, expected):
    assert resolve(arch, targets, layers=layers) == expected


def test_sorted_by_layer_number_not_string():
    got = resolve("llama", "2.q_proj,10.q_proj,1.q_proj", 12)
    assert [layer_of(n) for n in got] == [1, 2, 10]


# ---- errors ----

@pytest.mark.parametrize("arch, targets, kw, message", [
    ("llama", "proj", {}, r"target 'proj' matches no module"),  # never a substring inside a word
    ("llama", "c_attn", {}, r"self_attn\.\{q,k,v,o\}_proj, mlp\.\{gate,up,down\}_proj; "
                            r"outside layers: model\.embed_tokens, lm_head"),
    ("gpt2", "q_proj", {}, r"attn\.c_attn, attn\.c_proj, mlp\.c_fc, mlp\.c_proj"),
    ("llama", "1.lm_head", {}, "matches no module"),  # a layer prefix never reaches outside the layers
    ("llama", "2.qkv", {}, r"layer 2 out of range: the model has 2 layers \(0-1\)"),
    ("llama", "12.qkv", {"mode": "legacy"}, "the model has 2 layers"),
    ("llama", "qkv", {"layers": [5]}, "layer 5 out of range: the model has 2 layers"),
    ("llama", "qkv", {"layers": []}, "no layers selected"),
    ("llama", "qkv", {"mode": "fuzzy"}, "strict, legacy"),
    ("llama", " , ", {}, "no target modules given"),
    ("llama", "25", {}, "matches no module"),
])
def test_resolve_errors(arch, targets, kw, message):
    with pytest.raises(TunelabError, match=message):
        resolve(arch, targets, **kw)


def test_no_match_error_names_the_valid_choices():
    with pytest.raises(TunelabError) as err:
        resolve("llama", "attn_out", 28, layers=[25, 26, 27])
    text = str(err.value)
    assert "\n" not in text
    for part in ("in layers 25-27", "layers 0-27 each", "Groups: qkv, o, mlp_in, mlp_out, attn, mlp, all",
                 "query_key_value"):
        assert part in text


# ---- unknown architectures ----

MYSTERY = [
    "backbone.tok_emb",
    *[f"backbone.blocks.{i}.{rel}" for i in range(3)
      for rel in ("attention.Wqkv", "attention.out_proj", "ffn.w1", "ffn.w3", "ffn.w2", "ffn.router")],
    "head",
]


@pytest.mark.parametrize("targets, rels", [
    ("qkv", {"attention.Wqkv"}),
    ("o", {"attention.out_proj"}),
    ("mlp", {"ffn.w1", "ffn.w2", "ffn.w3"}),
    ("all", {"attention.Wqkv", "attention.out_proj", "ffn.w1", "ffn.w2", "ffn.w3"}),
    ("query_key_value", {"attention.Wqkv"}),
    ("router", {"ffn.router"}),
])
def test_unknown_arch_uses_heuristic(targets, rels):
    got = by_layer(resolve_targets(MYSTERY, "mystery", 3, targets, layers=[0, 2]))
    assert got == {0: rels, 2: rels}


def test_known_type_with_foreign_names_falls_back_to_heuristic():
    # a remote-code fork reusing "llama" with GPT-NeoX names still resolves
    names = [f"model.layers.{i}.{rel}" for i in range(2)
             for rel in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]
    assert arch_groups(names, "llama")["qkv"] == ("query_key_value",)
    assert by_layer(resolve_targets(names, "llama", 2, "attn"))[1] == {"attention.query_key_value",
                                                                       "attention.dense"}


CHATGLM_V1 = [f"transformer.layers.{i}.{rel}" for i in range(28) for rel in (
    "attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")] + ["lm_head"]
CHATGLM_V2 = [f"transformer.encoder.layers.{i}.{rel}" for i in range(28) for rel in (
    "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]


@pytest.mark.parametrize("names", [CHATGLM_V1, CHATGLM_V2], ids=["chatglm-6b", "chatglm2-6b"])
def test_chatglm_remote_code_names(names):
    """The 2023 commands on a real ChatGLM keep their meaning: freeze mlp of the last 3, LoRA qkv."""
    mlp = resolve_targets(names, "chatglm", 28, "mlp", layers=freeze_layers(3, 28))
    assert {layer_of(n) for n in mlp} == {25, 26, 27} and len(mlp) == 6
    qkv = resolve_targets(names, "chatglm", 28, "query_key_value")
    assert len(qkv) == 28 and all(n.endswith(".query_key_value") for n in qkv)
    assert len(resolve_targets(names, "chatglm", 28, "dense")) == 28  # attention dense only


# ---- the architecture table matches real transformers models ----

@pytest.mark.parametrize("arch", sorted(set(ARCH_GROUPS) - NOT_IN_TRANSFORMERS))
def test_arch_table_matches_transformers(arch):
    names = leaf_names(arch)
    rels = by_layer(list(names))[1]
    table = ARCH_GROUPS[arch]
    assert arch_groups(list(names), arch) is table
    for group, suffixes in table.items():
        for suffix in suffixes:
            assert any(rel == suffix or rel.endswith("." + suffix) for rel in rels), (arch, group, suffix)
    # each module belongs to at most one base group
    per_group = [set(by_layer(resolve(arch, group)).get(1, ())) for group in table]
    assert sum(map(len, per_group)) == len(set().union(*per_group))


# ---- printed listings ----

@pytest.mark.parametrize("names, expected", [
    (leaf_names("llama", 28), "layers 0-27 each: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj; "
                              "outside layers: model.embed_tokens, lm_head"),
    (leaf_names("gpt2"), "layers 0-1 each: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; "
                         "outside layers: transformer.wte, transformer.wpe, lm_head"),
    (["m.layers.0.a.x_proj", "m.layers.1.a.x_proj", "m.layers.2.b", "m.layers.3.a.x_proj"],
     "layers 0-1,3 each: a.x_proj; layer 2: b"),
    ([], "(no modules)"),
])
def test_describe_modules(names, expected):
    assert describe_modules(list(names)) == expected


def test_format_target_table():
    selected = resolve("llama", "qkv,lm_head,27.o_proj", 28, layers=[2, 25, 26, 27])
    assert format_target_table(selected, 28) == "\n".join([
        "14 target modules in 4 of 28 layers",
        "layer 2        | self_attn.k_proj, self_attn.q_proj, self_attn.v_proj",
        "layers 25-26   | self_attn.k_proj, self_attn.q_proj, self_attn.v_proj",
        "layer 27       | self_attn.k_proj, self_attn.o_proj, self_attn.q_proj, self_attn.v_proj",
        "outside layers | lm_head",
    ])


# ---- LoRA trainable parameters on a real tiny model ----

def test_lora_trainable_count_matches_analytic(tiny_model_factory):
    """LoRA r=8 on q,k,v of layers 25-27 of a 28-layer tiny Llama (hidden 32, 4 heads, 2 kv heads)."""
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", 28))
    leaves = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    names = resolve_targets(leaves, model.config.model_type, model.config.num_hidden_layers, SEED_QKV)
    modules = dict(model.named_modules())
    r = 8
    analytic = sum(r * (modules[n].in_features + modules[n].out_features) for n in names)
    assert analytic == 3 * r * ((32 + 32) + (32 + 16) + (32 + 16))  # q: 32->32, k and v: 32->16 (2 kv heads x 8)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules=names, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == analytic == 3840
