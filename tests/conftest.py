"""Shared test fixtures: a tiny byte-level BPE tokenizer with a ChatML chat template, and tiny random
models of several architectures (Llama, Qwen2, GPT-2 with fused qkv, GLM) saved as local HF model
directories. Everything is built offline in seconds; nothing here is part of the package.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Hello, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Give three tips for staying healthy. Eat well, sleep well, and exercise.",
    "你好，今天天气怎么样？我很好，谢谢。",
    "凉宫春日：我对普通的人类没有兴趣！",
    "问：答：[Round 0]\n",
    "You are a helpful assistant. Answer briefly.",
] * 20


def build_tiny_tokenizer(out_dir: Path):
    """Byte-level BPE (every string encodes; vocab ~300) wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _config(arch: str, vocab_size: int, num_layers: int, eos_id: int, pad_id: int):
    from transformers import GlmConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, num_hidden_layers=num_layers, eos_token_id=eos_id,
                  pad_token_id=pad_id, bos_token_id=None)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_head=4, n_positions=512, **{**common, "n_layer": num_layers})
    kw = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, **common)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "glm": GlmConfig}[arch](**kw)


ARCHS = ("llama", "qwen2", "gpt2", "glm")


def build_tiny_model(out_dir: Path, arch: str, tokenizer_dir: Path, num_layers: int = 4, seed: int = 0) -> Path:
    """A random tiny model of `arch` saved (safetensors) with the tiny tokenizer in out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = _config(arch, len(tok), num_layers, tok.eos_token_id, tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tiny_tokenizer_dir):
    """tiny_model_factory(arch="llama", num_layers=4) -> path of a saved tiny model (cached per session)."""
    made: dict[tuple[str, int], Path] = {}

    def make(arch: str = "llama", num_layers: int = 4) -> Path:
        key = (arch, num_layers)
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny_{arch}_{num_layers}")
            made[key] = build_tiny_model(out, arch, tiny_tokenizer_dir, num_layers)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own tunelab cache, so tokenized-data and model caches never leak between tests."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "tunelab_cache"))


def write_tiny_dataset(data_dir: Path, n: int = 16) -> Path:
    """A small alpaca-format data set `tiny` (some rows with history) plus dataset_info.json."""
    import json

    data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        row = {"instruction": f"Say hello number {i}.", "input": "", "output": f"Hello {i}! I am fine, thank you."}
        if i % 3 == 0:
            row["history"] = [["你好", "你好，今天天气怎么样？"]]
        rows.append(row)
    (data_dir / "tiny.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    info = {"tiny": {"file_name": "tiny.json", "columns": {"prompt": "instruction", "query": "input",
                                                            "response": "output", "history": "history"}}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return data_dir


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "data")
