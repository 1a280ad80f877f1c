"""`tunelab export`: merged LoRA/Freeze models reload in plain transformers (a subprocess that never imports
tunelab) with the adapter model's logits; sharding, chat template with the source_prefix, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from chat_helpers import make_freeze, make_full, make_lora, make_p_tuning

from tunelab.errors import TunelabError
from tunelab.export import EXPORT_FILE, main, parse_size, renders_system, with_default_system
from tunelab.methods import get_method, method_names

PREFIX = "You are Haruhi."
IDS = [5, 17, 42, 99, 123, 7, 250, 3]

# Runs in a fresh interpreter, outside the repo: plain transformers only.
LOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        logits = model(torch.tensor([%s])).logits
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    out[path] = {"logits": logits.tolist(), "prompt": prompt}
assert not any(name.startswith("tunelab") for name in sys.modules), "tunelab was imported"
print(json.dumps(out))
""" % IDS


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("1GiB", 2**30), ("500kb", 500_000), ("1024", 1024),
                                        ("1.5MB", 1_500_000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "2 TB", "GB", "-1GB", "0"])
def test_parse_size_refuses_non_sizes(text):
    with pytest.raises(TunelabError, match="export_size"):
        parse_size(text)


def test_default_system_prompt_only_when_the_conversation_has_none(tiny_tokenizer):
    template = with_default_system(tiny_tokenizer.chat_template, 'Say "hi"\n you')
    assert renders_system(tiny_tokenizer, tiny_tokenizer.chat_template)
    render = lambda msgs: tiny_tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False)  # noqa: E731
    assert render([{"role": "user", "content": "x"}]).startswith('<|im_start|>system\nSay "hi"\n you<|im_end|>')
    own = render([{"role": "system", "content": "mine"}, {"role": "user", "content": "x"}])
    assert own.startswith("<|im_start|>system\nmine<|im_end|>") and "Say" not in own
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no') }}{% endif %}"
                 "{% endfor %}")
    assert not renders_system(tiny_tokenizer, no_system)


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    """LoRA, Freeze and full checkpoints and their exports (small shards, so each export has several)."""
    root = tmp_path_factory.mktemp("export")
    ckpts = {"lora": make_lora(tiny_llama_dir, root / "lora", source_prefix=PREFIX),
             "freeze": make_freeze(tiny_llama_dir, root / "freeze"),
             "full": make_full(tiny_llama_dir, root / "full")}
    outs = {}
    for name, ckpt in ckpts.items():
        outs[name] = root / f"{name}_export"
        assert main(["--checkpoint_dir", str(ckpt), "--export_dir", str(outs[name]), "--export_size", "40KB"]) == 0
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "HF_HUB_OFFLINE": "1"}  # no PYTHONPATH: tunelab not on it
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, *map(str, outs.values())], capture_output=True,
                          text=True, cwd=root, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return ckpts, outs, json.loads(proc.stdout.strip().splitlines()[-1])


def _adapter_logits(base_dir, ckpt):
    """Logits of the checkpoint applied the way training left it (LoRA as a live, unmerged adapter)."""
    from transformers import AutoModelForCausalLM

    from tunelab.methods import load_trainable, read_method

    meta = read_method(ckpt)
    base = ckpt if get_method(meta["finetuning_type"]).whole_model else base_dir  # a full checkpoint is its own base
    model = load_trainable(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), ckpt, meta)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits


@pytest.mark.parametrize("method", method_names(lambda m: m.trains and m.merge is not None))  # all that export
def test_export_reloads_in_plain_transformers_with_equal_logits(exported, tiny_llama_dir, method):
    ckpts, outs, loaded = exported
    got = torch.tensor(loaded[str(outs[method])]["logits"])
    torch.testing.assert_close(got, _adapter_logits(tiny_llama_dir, ckpts[method]), rtol=0, atol=1e-5)
    with torch.no_grad():  # and the checkpoint matters: the base model's logits differ
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(torch.tensor([IDS])).logits
    assert (got - base).abs().max() > 1e-3


def test_export_files_shards_and_record(exported, tiny_llama_dir):
    ckpts, outs, _ = exported
    files = {p.name for p in outs["lora"].iterdir()}
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert all((outs["lora"] / s).stat().st_size < 80_000 for s in shards)  # 40KB shards (a big tensor may exceed)
    record = json.loads((outs["lora"] / EXPORT_FILE).read_text())
    assert record["methods"] == ["lora"] and record["source_prefix"] == PREFIX
    assert record["base_model"] == str(tiny_llama_dir)
    assert not [p for p in outs["lora"].parent.iterdir() if ".tmp-" in p.name]  # no temp folder left


def test_exported_chat_template_carries_the_source_prefix(exported, tiny_llama_dir):
    from tunelab.engine import ChatEngine, to_messages
    from tunelab.hparams import parse_args

    ckpts, outs, loaded = exported
    engine = ChatEngine.from_args(parse_args(["--checkpoint_dir", str(ckpts["lora"])]))
    same_as_tunelab = engine.tokenizer.decode(engine.prompt_ids(to_messages("Hi")))
    assert loaded[str(outs["lora"])]["prompt"] == same_as_tunelab and PREFIX in same_as_tunelab
    assert PREFIX not in loaded[str(outs["freeze"])]["prompt"]  # that run had no source_prefix


def test_p_tuning_cannot_be_exported(tiny_llama_dir, tmp_path):
    ckpt = make_p_tuning(tiny_llama_dir, tmp_path / "pt")
    with pytest.raises(TunelabError, match="P-Tuning v2 checkpoint, which cannot be merged"):
        main(["--checkpoint_dir", str(ckpt), "--export_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_used_directory_and_a_missing_flag(exported, tmp_path):
    ckpts, outs, _ = exported
    with pytest.raises(TunelabError, match="not empty"):
        main(["--checkpoint_dir", str(ckpts["lora"]), "--export_dir", str(outs["lora"])])
    with pytest.raises(TunelabError, match="--export_dir"):
        main(["--checkpoint_dir", str(ckpts["lora"])])
    with pytest.raises(TunelabError, match="did you mean export_size"):
        main(["--checkpoint_dir", str(ckpts["lora"]), "--export_dir", str(tmp_path / "x"), "--export_sise", "1GB"])


def test_export_refuses_its_own_input_as_output(tiny_llama_dir, tmp_path):
    """--export_dir the checkpoint itself, or a folder inside it or around it: the export would delete it."""
    ckpt = make_lora(tiny_llama_dir, tmp_path / "runs" / "lora")
    before = sorted(p.name for p in ckpt.iterdir())
    for target, word in ((ckpt, "is"), (ckpt / "merged", "overlaps"), (ckpt.parent, "overlaps")):
        with pytest.raises(TunelabError, match=f"--export_dir .* {word} the checkpoint"):
            main(["--checkpoint_dir", str(ckpt), "--export_dir", str(target), "--overwrite_output_dir"])
    assert sorted(p.name for p in ckpt.iterdir()) == before
