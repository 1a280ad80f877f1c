"""Study specs: the shipped seed specs expand to exactly the 2023 design (22 rows + base) with the
right targets and trainable counts on a toy 28-layer Llama; validation errors name the closest keys;
scales, axes, seeds and overrides expand as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_study_fakes import tiny_spec_dict

from tunelab.hparams import TunelabError
from tunelab.study.spec import apply_scale, expand, load_spec, override_shared, parse_spec, select_rows

REPO = Path(__file__).resolve().parents[1]
SEED_SPECS = ["examples/study_2023_04_24.yaml", "examples/study_2023_04_24_zh.yaml"]
ALL_SPECS = SEED_SPECS + ["examples/study_tiny.yaml"]
REFERENCE = REPO / "tunelab/study/reference/seed_study_2023_04_24_results.json"
# the 2023 labels in our vocabulary (ChatGLM-6B's 28 layers: 25-27 = last 3)
LAYERS_2023 = {"25-27": "last3", "0-2": "first3", "0-27": "all", "-": "all"}
WEIGHTS_2023 = {"query_key_value": "qkv", "qkv": "qkv", "prefix_encoder": "prefix", "mlp": "mlp"}


def _plans(path: str, scale: str | None = None, tmp: str = "/tmp/study"):
    return expand(load_spec(REPO / path), scale, tmp)


@pytest.mark.parametrize("path", ALL_SPECS)
def test_every_shipped_spec_loads_and_expands_at_every_scale(path):
    spec = load_spec(REPO / path)
    for scale in [None, *spec.scales]:
        plans = expand(spec, scale, "/tmp/s")
        assert plans[0].id == 0 and plans[0].train is None


@pytest.mark.parametrize("path", SEED_SPECS)
def test_seed_spec_is_the_2023_design(path):
    reference = json.loads(REFERENCE.read_text())["rows"]
    plans = _plans(path)
    assert [p.id for p in plans] == list(range(23))
    for plan, ref in zip(plans[1:], reference[1:]):
        assert plan.labels["method"] == ref["method"] == plan.train["finetuning_type"], plan.name
        assert plan.labels["aux"] == ref["aux"], plan.name
        assert plan.labels["layers"] == LAYERS_2023[ref["layers"]], plan.name
        assert plan.labels["weights"] == WEIGHTS_2023[ref["weights"]], plan.name
        assert plan.train["dataset"].count(",") == int(ref["aux"]), plan.name  # aux appended only to aux rows
    spec = load_spec(REPO / path)
    full = apply_scale(spec, "full")
    assert full.train["learning_rate"] == 1e-5 and full.train["num_train_epochs"] == 10
    assert full.train["lr_scheduler_type"] == "cosine" and full.train["per_device_train_batch_size"] == 8
    assert all(s["max_samples"] == 100 for s in full.eval_sets.values())
    assert all(p.train["pre_seq_len"] == 16 for p in plans if p.labels["method"] == "p_tuning")


def _toy_llama_modules(num_layers: int = 28) -> list[str]:
    names = ["model.embed_tokens", "lm_head"]
    for i in range(num_layers):
        names += [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    return names


def _resolved(train: dict, mode: str = "strict") -> list[str]:
    from tunelab.targets import freeze_layers, parse_layer_spec, resolve_targets

    names = _toy_llama_modules()
    if train["finetuning_type"] == "freeze":
        layers = freeze_layers(train["num_layer_trainable"], 28)
        return resolve_targets(names, "llama", 28, train.get("name_module_trainable", "mlp"), layers, "strict")
    layers = parse_layer_spec(train["target_layers"], 28) if train.get("target_layers") else None
    return resolve_targets(names, "llama", 28, train.get("lora_target", "qkv"), layers, mode)


EXPECTED_LAYERS = {"last3": {25, 26, 27}, "first3": {0, 1, 2}, "all": set(range(28))}
EXPECTED_SUFFIXES = {"qkv": {"q_proj", "k_proj", "v_proj"}, "mlp": {"gate_proj", "up_proj", "down_proj"}}


@pytest.mark.parametrize("path", SEED_SPECS)
def test_seed_rows_resolve_to_the_designed_modules_on_a_28_layer_llama(path):
    for plan in _plans(path)[1:]:
        if plan.labels["method"] == "p_tuning":
            continue
        names = _resolved(plan.train)
        layers = {int(n.split(".")[2]) for n in names}
        suffixes = {n.rsplit(".", 1)[1] for n in names}
        assert layers == EXPECTED_LAYERS[plan.labels["layers"]], plan.name
        assert suffixes == EXPECTED_SUFFIXES[plan.labels["weights"]], plan.name


def test_legacy_matching_reproduces_the_nine_layer_2023_lora_rows():
    spec = override_shared(load_spec(REPO / SEED_SPECS[0]), {"target_match": "legacy"})
    plans = {p.id: p for p in expand(spec, None, "/tmp/s")}
    for row_id in (13, 14, 19, 20):
        layers = {int(n.split(".")[2]) for n in _resolved(plans[row_id].train, mode="legacy")}
        assert layers == {0, 1, 2, 10, 11, 12, 20, 21, 22}
    assert {int(n.split(".")[2]) for n in _resolved(plans[17].train, mode="legacy")} == {25, 26, 27}


# Toy Llama: hidden 32, intermediate 64, 4 heads, 2 kv heads (head_dim 8): q,o 32x32; k,v 32x16; mlp 32x64 x3.
# LoRA r=8 adds 8*(in+out) per Linear; Freeze trains the Linear weights; the prefix is 16 x 28 x 2 x (2*8).
PER_LAYER = {("lora", "qkv"): 8 * (64 + 48 + 48), ("lora", "mlp"): 3 * 8 * 96,
             ("freeze", "qkv"): 32 * 32 + 2 * 32 * 16, ("freeze", "mlp"): 3 * 32 * 64}
LAYER_COUNT = {"last3": 3, "first3": 3, "all": 28}


def test_seed_rows_train_the_analytic_parameter_counts(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    from tunelab.hparams import parse_args
    from tunelab.methods import prepare_model

    model_dir = tiny_model_factory("llama", 28)
    for plan in _plans(SEED_SPECS[0])[1:]:
        method, weights = plan.labels["method"], plan.labels["weights"]
        if method == "p_tuning":
            expected = 16 * 28 * 2 * 16
        else:
            expected = PER_LAYER[method, weights] * LAYER_COUNT[plan.labels["layers"]]
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        _, info = prepare_model(model, parse_args(config=plan.train).finetune)
        assert info.trainable_params == expected, plan.name


def test_shipped_specs_use_registered_data_sets():
    registry = REPO / "data" / "dataset_info.json"
    names = set(json.loads(registry.read_text()))
    for path in ALL_SPECS:
        spec = load_spec(REPO / path)
        used = {spec.train["dataset"], spec.aux_dataset, *(s["dataset"] for s in spec.eval_sets.values())}
        assert used - {None} <= names, f"{path}: unregistered data sets {sorted(used - {None} - names)}"


@pytest.mark.parametrize("change, message", [
    ({"row": []}, "did you mean rows"),
    ({"train": {"dataset": "example", "learning_rat": 1e-4}}, "did you mean learning_rate"),
    ({"shared": {"output_dir": "x"}}, "set by the study runner"),
    ({"shared": {"seed": 1}}, "seeds:"),
    ({"eval_sets": {"persona": {"datset": "example"}}}, "did you mean dataset"),
    ({"eval_sets": {"persona": {"dataset": "example", "role": "styl"}}}, "unknown role"),
    ({"scales": {"quick": {"trian": {}}}}, "did you mean train"),
    ({"scales": {"quick": {"eval_sets": {"persona2": {}}}}}, "did you mean persona"),
    ({"default_scale": "quik", "scales": {"quick": {}}}, "did you mean quick"),
    ({"rows": [{"id": 1, "method": "lora", "weight": "qkv"}]}, "did you mean weights"),
    ({"rows": [{"id": 1, "method": "lora", "options": {"lora_targt": "qkv"}}]}, "did you mean lora_target"),
    ({"rows": [{"id": 1, "method": "lora_x"}]}, "'method' must be one of"),
    ({"rows": [{"id": 0, "method": "lora"}]}, "0 is the base row"),
    ({"rows": [{"id": 1, "method": "lora"}, {"id": 1, "method": "freeze"}]}, "duplicate ids"),
    ({"rows": [{"id": 1, "method": "lora", "aux": True}], "aux_dataset": None}, "need an 'aux_dataset'"),
    ({"axes": {"method": {"lora": {}}}}, "not both"),
    ({"decide_on": {"style": "bleu"}}, r"decide_on: style: unknown measure 'bleu': valid: nll, bleu_rouge$"),
    ({"decide_on": {"style": "kl"}}, "not progress toward the persona"),
    ({"decide_on": {"retention": "ppl"}}, "valid: nll, kl, bleu_rouge"),
    ({"decide_on": {"general": "nll"}}, "decide_on: unknown key 'general': valid: style, retention"),
    ({"decide_on": "nll"}, "decide_on: expected a mapping"),
])
def test_bad_specs_fail_with_the_closest_valid_names(change, message):
    with pytest.raises(TunelabError, match=message):
        parse_spec(tiny_spec_dict(**change))


def test_decide_on_defaults_to_the_likelihood_measures_and_fills_a_missing_role():
    assert parse_spec(tiny_spec_dict()).decide_on == {"style": "nll", "retention": "nll"}
    assert parse_spec(tiny_spec_dict(decide_on={"retention": "kl"})).decide_on == {"style": "nll", "retention": "kl"}
    both = {"style": "bleu_rouge", "retention": "bleu_rouge"}
    assert parse_spec(tiny_spec_dict(decide_on=both)).decide_on == both


def test_unknown_scale_names_the_valid_ones():
    spec = load_spec(REPO / SEED_SPECS[0])
    with pytest.raises(TunelabError, match="did you mean full"):
        expand(spec, "ful", "/tmp/s")


def test_scales_override_sizes():
    quick, full = _plans(SEED_SPECS[0], "quick"), _plans(SEED_SPECS[0], "full")
    assert quick[5].train["max_samples"] == 64 and full[5].train["max_samples"] == 10000
    assert quick[5].train["dataset"] == "persona_chat_en_train_spread"
    assert full[5].train["dataset"] == "persona_chat_en_train"
    assert quick[6].train["dataset"] == "persona_chat_en_train_spread,alpaca_gpt4_en_aux"
    assert quick[5].train["learning_rate"] == 2e-4 and full[5].train["learning_rate"] == 1e-5
    assert quick[5].evals["persona"]["max_samples"] == 48 and full[5].evals["persona"]["max_samples"] == 100
    assert quick[5].evals["persona"]["dataset"] == "persona_chat_en_test_spread"
    assert quick[5].evals["general"]["max_new_tokens"] == 48 and full[5].evals["general"]["max_new_tokens"] == 256
    assert quick[5].train["max_source_length"] == quick[5].evals["persona"]["max_source_length"] == 256
    assert _plans(SEED_SPECS[0])[5].train == quick[5].train  # quick is the default scale


def test_stage_configs_wire_checkpoints_and_the_base_row():
    plans = expand(parse_spec(tiny_spec_dict()), None, "/tmp/st")
    base, lora, freeze = plans[0], plans[1], plans[2]
    assert base.dir == "rows/r00_base_s42" and base.train is None
    assert base.evals["persona"]["finetuning_type"] == "none" and "checkpoint_dir" not in base.evals["persona"]
    assert lora.evals["general"]["checkpoint_dir"] == lora.train["output_dir"] == "/tmp/st/rows/r01_lora_qkv_s42/train"
    assert lora.evals["general"]["do_predict"] and lora.evals["general"]["dataset"] == "alpaca_gpt4_en"
    assert freeze.train["dataset"] == "example,identity" and freeze.train["finetuning_type"] == "freeze"
    assert [s for s, _ in freeze.stages()] == ["train", "persona", "general"]


def test_row_format_options_reach_its_evals():
    spec = tiny_spec_dict()
    spec["rows"][0]["options"]["source_prefix"] = "You are Ann."
    plans = expand(parse_spec(spec), None, "/tmp/s")
    assert plans[1].evals["persona"]["source_prefix"] == "You are Ann."
    assert "source_prefix" not in plans[2].evals["persona"]


def test_axes_are_crossed_in_order():
    spec = tiny_spec_dict(axes={"method": {"lora": {"lora_target": "qkv"}, "freeze": {}},
                                "aux": {False: {}, True: {}}})
    del spec["rows"]
    plans = expand(parse_spec(spec), None, "/tmp/s")
    names = [(0, "base"), (1, "lora"), (2, "lora_aux"), (3, "freeze"), (4, "freeze_aux")]
    assert [(p.id, p.name) for p in plans] == names
    assert plans[2].train["dataset"] == "example,identity" and plans[1].train["lora_target"] == "qkv"


def test_seeds_repeat_trained_rows_and_not_the_base():
    plans = expand(parse_spec(tiny_spec_dict(seeds=[1, 2])), None, "/tmp/s")
    assert [(p.id, p.seed) for p in plans] == [(0, 1), (1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]
    assert plans[2].dir == "rows/r01_lora_qkv_s2" and plans[2].train["seed"] == 2


def test_fingerprint_ignores_the_study_dir_but_not_options():
    a = expand(parse_spec(tiny_spec_dict()), None, "/tmp/a")[1]
    b = expand(parse_spec(tiny_spec_dict()), None, "/elsewhere/b")[1]
    c = expand(override_shared(parse_spec(tiny_spec_dict()), {"max_source_length": 32}), None, "/tmp/a")[1]
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_select_rows_keeps_the_base_row_and_rejects_unknown_ids():
    plans = expand(parse_spec(tiny_spec_dict()), None, "/tmp/s")
    assert [p.id for p in select_rows(plans, [2])] == [0, 2]
    with pytest.raises(TunelabError, match="no row 9"):
        select_rows(plans, [9])


def test_set_seeds_replaces_the_seed_list_at_every_scale():
    spec = parse_spec(tiny_spec_dict(seeds=[1, 2], scales={"quick": {"seeds": [3]}}))
    spec = override_shared(spec, {"seeds": [7], "target_match": "legacy"})
    for scale in (None, "quick"):
        plans = expand(spec, scale, "study")
        assert {p.seed for p in plans if p.id != 0} == {7}
        assert all(p.train["target_match"] == "legacy" for p in plans if p.train)
    with pytest.raises(TunelabError, match="--set seeds"):
        override_shared(spec, {"seeds": "x"})
