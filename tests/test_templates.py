"""Prompt formats (tunelab/templates.py): golden strings for chatglm (the 2023 format), auto (the tiny ChatML
tokenizer) and plain; labels mask exactly the prompt; truncation keeps the prompt's end and the response's end
tokens; start-token handling; errors."""

from __future__ import annotations

import dataclasses

import pytest

from tunelab.data import Example
from tunelab.errors import TunelabError
from tunelab.templates import IGNORE_INDEX, get_template, keep_end, start_ids

HARUHI = Example(prompt="介绍一下你自己", query="（简短）", response="我是春日。",
                 history=(("你好", "你好呀"), ("你是谁", "我是凉宫春日")))
CHAT = Example(prompt="Say hi", query="to Bob", response="Hello Bob!", history=(("q1", "r1"),))
CHAT_NO_HISTORY = Example(prompt="Say hi", query="to Bob", response="Hello Bob!")


class CharTokenizer:
    """ids = code points; like Llama's tokenizer it puts a start token (0) before plain text; eos = 1."""

    bos_token_id, eos_token_id = 0, 1
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]


class CharChat(CharTokenizer):
    """A prefix-stable chat format that, unlike Llama 3's, does not write the start token itself."""

    chat_template = "role: content|"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"{m['role']}: {m['content']}|" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")


class OddChat(CharChat):
    """The generation prompt is not a prefix of the full conversation (e.g. templates that drop reasoning)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return super().apply_chat_template(messages) + ("A:" if add_generation_prompt else "")


# ---------------------------------------------------------------- golden strings

def test_chatglm_prompt_with_prefix_and_two_history_rounds(tiny_tokenizer):
    text = get_template("chatglm", tiny_tokenizer).render_prompt(HARUHI, "你是凉宫春日。\n")
    assert text == ("你是凉宫春日。\n[Round 0]\n问：你好\n答：你好呀\n[Round 1]\n问：你是谁\n答：我是凉宫春日\n"
                    "[Round 2]\n问：介绍一下你自己（简短）\n答：")


def test_chatglm_without_history_is_prefix_plus_query_as_in_2023(tiny_tokenizer):
    ex = Example(prompt="Translate: ", query="你好", response="Hello")
    assert get_template("chatglm", tiny_tokenizer).render_prompt(ex, "PREFIX ") == "PREFIX Translate: 你好"
    assert get_template("chatglm", tiny_tokenizer).render_prompt(ex, None) == "Translate: 你好"


def test_chatglm_row_system_gets_a_line_break_and_wins_over_source_prefix(tiny_tokenizer):
    ex = Example(prompt="hi", query="", response="yo", system="You are Yui.")
    assert get_template("chatglm", tiny_tokenizer).render_prompt(ex, "ignored") == "You are Yui.\nhi"


def test_chatglm_ids_are_prompt_then_response_then_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels = get_template("chatglm", tok).encode_train(tok, HARUHI, None, 512, 512)
    prompt = tok.encode(get_template("chatglm", tok).render_prompt(HARUHI, None), add_special_tokens=False)
    response = tok.encode("我是春日。", add_special_tokens=False) + [tok.eos_token_id]
    assert ids == prompt + response
    assert labels == [IGNORE_INDEX] * len(prompt) + response


def test_auto_renders_the_tokenizers_chat_template(tiny_tokenizer):
    text = get_template("auto", tiny_tokenizer).render_prompt(CHAT, "You are helpful.")
    assert text == ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
                    "<|im_start|>assistant\nr1<|im_end|>\n<|im_start|>user\nSay hi\nto Bob<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_auto_supervises_the_answer_and_its_end_of_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels = get_template("auto", tok).encode_train(tok, CHAT, None, 512, 512)
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(supervised) == "Hello Bob!<|im_end|>\n"
    assert tok.decode(ids) == ("<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\nr1<|im_end|>\n"
                               "<|im_start|>user\nSay hi\nto Bob<|im_end|>\n<|im_start|>assistant\n"
                               "Hello Bob!<|im_end|>\n")


def test_auto_row_system_wins_over_source_prefix(tiny_tokenizer):
    ex = Example(prompt="hi", query="", response="yo", system="You are Yui.")
    text = get_template("auto", tiny_tokenizer).render_prompt(ex, "ignored")
    assert text.startswith("<|im_start|>system\nYou are Yui.<|im_end|>\n") and "ignored" not in text


def test_plain_format(tiny_tokenizer):
    template = get_template("plain", tiny_tokenizer)
    assert template.render_prompt(CHAT, "Be brief.") == "Be brief.\n\nq1\nr1\nSay hi\nto Bob\n"
    assert template.render_prompt(Example("hi", "", "yo"), None) == "hi\n"


# ---------------------------------------------------------------- labels and truncation

@pytest.mark.parametrize("name", ["auto", "chatglm", "plain"])
def test_labels_mask_exactly_the_generation_prompt(tiny_tokenizer, name):
    tok, template = tiny_tokenizer, get_template(name, tiny_tokenizer)
    ids, labels = template.encode_train(tok, CHAT, "SYS", 512, 512)
    prompt = template.encode_prompt(tok, CHAT, "SYS", 512)
    n = len(prompt)
    assert ids[:n] == prompt
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] and len(ids) > n


@pytest.mark.parametrize("name", ["auto", "chatglm", "plain"])
def test_long_prompts_drop_the_oldest_turns_first_keeping_the_system(tiny_tokenizer, name):
    tok, template = tiny_tokenizer, get_template(name, tiny_tokenizer)
    ex = Example("Say hi", "", "Hello!", (("q1", "r1"), ("q2", "r2"), ("q3", "r3")), system="You are Yui.")
    latest = Example("Say hi", "", "Hello!", (("q3", "r3"),), system="You are Yui.")
    limit = len(template.encode_prompt(tok, latest, None, 512))
    ids, labels = template.encode_train(tok, ex, None, limit, 512)
    assert ids == template.encode_train(tok, latest, None, 512, 512)[0]
    assert tok.decode(ids).removeprefix("<|im_start|>system\n").startswith("You are Yui.")
    no_history = dataclasses.replace(ex, history=())  # still too long: no history, and the end kept
    assert template.encode_prompt(tok, ex, None, 5) == template.encode_prompt(tok, no_history, None, 512)[-5:]


@pytest.mark.parametrize("name", ["auto", "chatglm", "plain"])
def test_truncation_keeps_the_prompt_end_and_the_response_end(tiny_tokenizer, name):
    tok, template = tiny_tokenizer, get_template(name, tiny_tokenizer)
    full_prompt = template.encode_prompt(tok, CHAT_NO_HISTORY, "SYS", 512)
    _, full_labels = template.encode_train(tok, CHAT_NO_HISTORY, "SYS", 512, 512)
    ids, labels = template.encode_train(tok, CHAT_NO_HISTORY, "SYS", 6, 3)
    assert ids[:6] == full_prompt[-6:]          # the query nearest the answer survives
    end = 2 if name == "auto" else 1           # "<|im_end|>" "\n" / eos
    full_response = [t for t in full_labels if t != IGNORE_INDEX]
    assert labels[6:] == full_response[:3 - end] + full_response[-end:]
    assert len(ids) == 6 + 3


def test_start_token_is_added_once_and_kept_when_truncating():
    tok = CharTokenizer()
    template = get_template("chatglm", tok)
    assert start_ids(tok) == [0]
    assert template.encode_prompt(tok, Example("abcdef", "", "xyz"), None, 512) == [0] + [ord(c) for c in "abcdef"]
    assert template.encode_prompt(tok, Example("abcdef", "", "xyz"), None, 4) == [0, ord("d"), ord("e"), ord("f")]
    ids, labels = template.encode_train(tok, Example("ab", "", "xyz"), None, 512, 3)
    assert ids == [0, ord("a"), ord("b"), ord("x"), ord("y"), 1]
    assert labels == [IGNORE_INDEX] * 3 + [ord("x"), ord("y"), 1]


def test_auto_adds_the_start_token_the_template_does_not_write():
    tok = CharChat()
    ids = get_template("auto", tok).encode_prompt(tok, Example("hi", "", "yo"), None, 512)
    assert ids == [0] + [ord(c) for c in "user: hi|assistant: "]


def test_tokenizers_without_a_start_token(tiny_tokenizer):
    assert start_ids(tiny_tokenizer) == []


def test_keep_end():
    assert keep_end([1, 2, 3, 4, 5], 3) == [3, 4, 5]
    assert keep_end([9, 2, 3, 4, 5], 3, head=1) == [9, 4, 5]
    assert keep_end([1, 2], 3, head=1) == [1, 2]


# ---------------------------------------------------------------- errors

def test_unknown_template_lists_the_valid_names(tiny_tokenizer):
    with pytest.raises(TunelabError, match="unknown template 'chatglm2': valid: auto, chatglm, plain"):
        get_template("chatglm2", tiny_tokenizer)


def test_auto_without_a_chat_template_suggests_chatglm_or_plain():
    with pytest.raises(TunelabError, match="no chat template.*--template chatglm.*--template plain"):
        get_template("auto", CharTokenizer())


def test_auto_refuses_a_template_whose_prompt_is_not_a_prefix():
    tok = OddChat()
    template = get_template("auto", tok)
    assert template.render_prompt(Example("hi", "", "yo"), None).endswith("A:")
    with pytest.raises(TunelabError, match="not a prefix"):
        template.encode_train(tok, Example("hi", "", "yo"), None, 512, 512)
