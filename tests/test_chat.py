"""The chat engine (messages, template + source_prefix, history, streaming, cancelling, checkpoints) and
`tunelab chat` driven through a pipe."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from chat_helpers import make_freeze, make_full, make_lora, make_p_tuning
from conftest import REPO

from tunelab.engine import ChatEngine, history_messages, resolve_settings, to_example, to_messages
from tunelab.errors import TunelabError
from tunelab.hparams import GenerationArguments, parse_args

PREFIX = "You are Haruhi."


@pytest.fixture(scope="module")
def lora_dir(tiny_llama_dir, tmp_path_factory):
    return make_lora(tiny_llama_dir, tmp_path_factory.mktemp("lora"), source_prefix=PREFIX)


@pytest.fixture(scope="module")
def engine(lora_dir):
    return ChatEngine.from_args(parse_args(["--checkpoint_dir", str(lora_dir), "--max_new_tokens", "24"]))


# ---- pure parts ----

def test_history_and_query_become_alternating_messages():
    history = [("Hi", "Hello!"), ("Who are you?", "Yui.")]
    assert history_messages(history) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                         {"role": "user", "content": "Who are you?"},
                                         {"role": "assistant", "content": "Yui."}]
    assert history_messages([]) == []
    messages = to_messages("And now?", history, system="Be brief.")
    assert messages == [{"role": "system", "content": "Be brief."}, *history_messages(history),
                        {"role": "user", "content": "And now?"}]
    assert to_example(messages).history == tuple(history)  # the round trip the engine relies on


def test_to_example_splits_system_history_and_query():
    messages = to_messages("third", history=[("first", "one"), ("second", "two")], system="sys")
    ex = to_example(messages)
    assert (ex.prompt, ex.system, ex.history) == ("third", "sys", (("first", "one"), ("second", "two")))
    assert to_example([{"role": "user", "content": "hi"}]).system is None


@pytest.mark.parametrize("roles", [[], ["assistant"], ["user", "user"], ["user", "assistant"],
                                   ["system", "system", "user"], ["user", "assistant", "assistant", "user"],
                                   ["tool"]])
def test_to_example_refuses_what_a_template_cannot_hold(roles):
    with pytest.raises(TunelabError, match="messages"):
        to_example([{"role": r, "content": "x"} for r in roles])


def test_resolve_settings():
    base = GenerationArguments(max_length=300)
    greedy, seed = resolve_settings(base, {"temperature": 0.0, "max_new_tokens": 5, "seed": 7})
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.max_length, seed) == (False, 5, None, 7)
    sampled, _ = resolve_settings(base, {"temperature": 0.5, "top_p": None})
    assert (sampled.do_sample, sampled.temperature, sampled.top_p) == (True, 0.5, base.top_p)
    with pytest.raises(TunelabError, match="did_sample|valid: max_new_tokens"):
        resolve_settings(base, {"did_sample": True})


# ---- the engine on a tiny model with a LoRA checkpoint ----

def test_engine_takes_template_and_source_prefix_from_the_run(engine):
    assert (engine.method, engine.source_prefix) == ("lora", PREFIX) and engine.name.startswith("lora")
    text = engine.tokenizer.decode(engine.prompt_ids(to_messages("How are you?", history=[("Hi", "Hello!")])))
    assert text == ("<|im_start|>system\nYou are Haruhi.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    own = engine.tokenizer.decode(engine.prompt_ids(to_messages("Hi", system="Be brief.")))
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>") and PREFIX not in own


def test_history_changes_the_answer_and_usage_counts(engine):
    alone = engine.chat(to_messages("How are you?"))
    with_history = engine.chat(to_messages("How are you?", history=[("你好", "你好，今天天气怎么样？")]))
    assert with_history.prompt_tokens > alone.prompt_tokens
    assert alone.usage["total_tokens"] == alone.prompt_tokens + alone.completion_tokens
    assert 0 < alone.completion_tokens <= 24 and alone.finish_reason in ("stop", "length")
    assert (alone.finish_reason == "length") == (alone.completion_tokens == 24)


def test_streaming_equals_non_streaming_greedy(engine):
    for query in ("Hello, how are you?", "凉宫春日", "Give three tips."):
        messages = to_messages(query)
        gen = engine.stream(messages)
        pieces = list(gen)
        assert "".join(pieces) == gen.reply.text == engine.chat(messages).text
    assert engine.in_flight == 0


def test_cancel_stops_a_long_generation_and_frees_the_model(engine):
    gen = engine.stream(to_messages("Hello"), max_new_tokens=50_000)  # ~a minute if not stopped
    time.sleep(0.2)
    start = time.time()
    gen.cancel()
    list(gen)
    assert time.time() - start < 5 and gen.reply.finish_reason == "cancelled"
    assert engine.scheduler.wait_idle(timeout=5)  # the batch worker stopped generating and ended
    assert engine.in_flight == 0 and engine.chat(to_messages("Hi"), max_new_tokens=2).completion_tokens > 0


def test_concurrent_generations_queue_and_do_not_interleave(engine):
    messages = to_messages("Hello, how are you?")
    expected = engine.chat(messages).text
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append("".join(engine.stream(messages)))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [expected] * 3


def test_several_lora_checkpoints_merge_in_order(tiny_llama_dir, lora_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    second = make_lora(tiny_llama_dir, tmp_path / "second", seed=5)
    engine = ChatEngine.from_args(parse_args(["--checkpoint_dir", f"{lora_dir},{second}"]))
    manual = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for ckpt in (lora_dir, second):
        manual = PeftModel.from_pretrained(manual, str(ckpt)).merge_and_unload()
    ids = torch.tensor([engine.prompt_ids(to_messages("Hello"))])
    with torch.no_grad():
        torch.testing.assert_close(engine.model(ids).logits, manual(ids).logits, rtol=0, atol=1e-5)
    assert engine.name == "second"


def test_p_tuning_checkpoint_streams_like_it_generates(tiny_llama_dir, tmp_path):
    ckpt = make_p_tuning(tiny_llama_dir, tmp_path / "pt")
    engine = ChatEngine.from_args(parse_args(["--checkpoint_dir", str(ckpt), "--max_new_tokens", "16"]))
    base = ChatEngine.from_args(parse_args(["--model_name_or_path", str(tiny_llama_dir), "--max_new_tokens", "16"]))
    messages = to_messages("Hello, how are you?")
    gen = engine.stream(messages)
    assert "".join(gen) == gen.reply.text == engine.chat(messages).text
    assert engine.method == "p_tuning" and gen.reply.text != base.chat(messages).text


@pytest.mark.parametrize("make", [make_freeze, make_full])
def test_freeze_and_full_checkpoints_load(tiny_llama_dir, tmp_path, make):
    from transformers import AutoModelForCausalLM

    from tunelab.methods import get_method, load_trainable, read_method

    ckpt = make(tiny_llama_dir, tmp_path / "ckpt")
    engine = ChatEngine.from_args(parse_args(["--checkpoint_dir", str(ckpt)]))
    meta = read_method(ckpt)
    base = ckpt if get_method(meta["finetuning_type"]).whole_model else tiny_llama_dir
    expected = load_trainable(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), ckpt, meta)
    ids = torch.tensor([engine.prompt_ids(to_messages("Hello"))])
    with torch.no_grad():
        torch.testing.assert_close(engine.model(ids).logits, expected(ids).logits, rtol=0, atol=0)
    assert engine.method == meta["finetuning_type"]


# ---- tunelab chat through a pipe ----

def test_cli_chat_answers_one_line_per_input_line(engine, lora_dir):
    from tunelab.chat import one_line

    stdin = "Hello, how are you?\n\nclear\n凉宫春日\nexit\nnever answered\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, "-m", "tunelab", "chat", "--checkpoint_dir", str(lora_dir),
                          "--max_new_tokens", "24"], input=stdin, capture_output=True, text=True,
                         encoding="utf-8", env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = [one_line(engine.chat(to_messages(q)).text) for q in ("Hello, how are you?", "凉宫春日")]
    assert out.stdout.split("\n") == [*expected, ""]


def test_cli_chat_keeps_history_until_clear(engine):
    import io

    from tunelab.chat import one_line, run

    first = engine.chat(to_messages("Hi")).text
    second = engine.chat(to_messages("Again", history=[("Hi", first)])).text
    out = io.StringIO()
    run(engine, io.StringIO("Hi\nAgain\nclear\nAgain\n"), out, interactive=False)
    fresh = engine.chat(to_messages("Again")).text
    assert out.getvalue().split("\n") == [one_line(t) for t in (first, second, fresh)] + [""]


def test_one_line_is_reversible():
    from tunelab.chat import one_line

    assert one_line("a\nb\\n\r") == "a\\nb\\\\n\\r"
