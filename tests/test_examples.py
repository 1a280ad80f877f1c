"""Every config shipped under examples/ loads through the loader its command uses, so none rots: train
configs through hparams.parse_args, study specs through the study spec loader (every stage of every row at
every scale parsed as options too), accelerate configs through accelerate's own config class, DeepSpeed
configs as JSON. A new kind of file fails here until it gets a loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SHIPPED = sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*") if p.is_file())


def _kind(rel: str) -> str | None:
    if rel.startswith("train_") and rel.endswith(".yaml"):
        return "train"
    if rel.startswith("study_") and rel.endswith(".yaml"):
        return "study"
    if rel.startswith("accelerate/") and rel.endswith(".yaml"):
        return "accelerate"
    if rel.startswith("deepspeed/") and rel.endswith(".json"):
        return "deepspeed"
    return None


def test_the_readme_and_the_seed_configs_are_shipped():
    assert {"train_lora.yaml", "study_2023_04_24.yaml", "study_tiny.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("rel", SHIPPED)
def test_every_shipped_config_has_a_loader(rel):
    assert _kind(rel) is not None, f"examples/{rel}: no loader in tests/test_examples.py for this kind of file"


@pytest.mark.parametrize("rel", [r for r in SHIPPED if _kind(r) == "train"])
def test_train_configs_parse_as_options(rel):
    from tunelab.hparams import check_stage, parse_args

    args = parse_args([str(EXAMPLES / rel)])
    assert check_stage(args.training) == "train"
    assert args.data.dataset and args.training.output_dir
    # the override the README shows: flags after the file win
    assert parse_args([str(EXAMPLES / rel), "--learning_rate", "1e-4"]).training.learning_rate == 1e-4


def test_train_lora_is_the_documented_run():
    from tunelab.hparams import parse_args

    args = parse_args([str(EXAMPLES / "train_lora.yaml")])
    assert (args.finetune.finetuning_type, args.finetune.lora_target) == ("lora", "qkv")
    assert args.data.dataset == "persona_chat_en_train" and args.finetune.plot_loss
    assert args.model.model_name_or_path is None  # the default model
    assert "examples/train_lora.yaml" in (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("rel", [r for r in SHIPPED if _kind(r) == "study"])
def test_study_specs_load_and_every_stage_parses_at_every_scale(rel, tmp_path):
    from tunelab.study.cli import validate_plans
    from tunelab.study.spec import expand, load_spec

    spec = load_spec(EXAMPLES / rel)
    for scale in [None, *spec.scales]:
        plans = expand(spec, scale, tmp_path)
        assert plans and plans[0].id == 0
        validate_plans(plans)


@pytest.mark.parametrize("rel", [r for r in SHIPPED if _kind(r) == "accelerate"])
def test_accelerate_configs_load_in_accelerate(rel):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(EXAMPLES / rel))  # unknown keys raise
    assert config.num_processes >= 1


@pytest.mark.parametrize("rel", [r for r in SHIPPED if _kind(r) == "deepspeed"])
def test_deepspeed_configs_are_json_with_a_zero_stage(rel):
    config = json.loads((EXAMPLES / rel).read_text(encoding="utf-8"))
    assert config["zero_optimization"]["stage"] in (2, 3)
    # batch and precision come from tunelab's flags (README: Scale out)
    assert config["train_micro_batch_size_per_gpu"] == "auto"
