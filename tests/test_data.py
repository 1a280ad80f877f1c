"""The data registry and loader (tunelab/data.py) and the shipped data/ folder: every error names what is
wrong, 2023 row semantics (max_samples per set, empty rows skipped), file formats, sharegpt, placeholders,
and every shipped data set loads with its recorded checksum, so none rots."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest

from conftest import DATA_DIR
from tunelab.data import Example, fill_identity, load_dataset_info, load_examples
from tunelab.errors import TunelabError
from tunelab.hparams import DataArguments

ALPACA_HISTORY = {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}
REQUIRED_NAMES = ("haruhi_persona_train", "haruhi_persona_test", "haruhi_all_train", "alpaca_gpt4_zh",
                  "alpaca_gpt4_en", "oaast_sft_zh", "self_cognition", "identity", "identity_en", "example",
                  "persona_chat_en_train", "persona_chat_en_test")


def rows(n: int, prefix: str = "q") -> list[dict]:
    return [{"instruction": f"{prefix}{i}", "input": "", "output": f"a{i}"} for i in range(n)]


def make_data(tmp_path: Path, files: dict[str, object], info: dict[str, dict]) -> Path:
    """A data folder with the given files (text, or rows written as a JSON list) and dataset_info.json."""
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False),
                        encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return tmp_path


def load(data_dir: Path, dataset: str, **kw):
    return load_examples(DataArguments(dataset=dataset, dataset_dir=str(data_dir), **kw))


# ---------------------------------------------------------------- errors

def test_missing_dataset_info_says_where_it_looked(tmp_path):
    with pytest.raises(TunelabError, match=f"{tmp_path}/dataset_info.json"):
        load_dataset_info(tmp_path)


def test_unknown_name_suggests_the_closest(tmp_path):
    d = make_data(tmp_path, {"a.json": rows(2)}, {"alpaca_gpt4_en": {"file_name": "a.json"}})
    with pytest.raises(TunelabError, match="unknown data set 'alpaca_gpt4_eng'.*did you mean alpaca_gpt4_en"):
        load(d, "alpaca_gpt4_eng")


def test_unknown_names_are_checked_before_any_file_is_read(tmp_path):
    d = make_data(tmp_path, {}, {"a": {"file_name": "missing.json"}})
    with pytest.raises(TunelabError, match="unknown data set 'b'"):
        load(d, "a,b")


def test_missing_file_names_the_path(tmp_path):
    d = make_data(tmp_path, {}, {"a": {"file_name": "sub/a.json"}})
    with pytest.raises(TunelabError, match=f"file not found: {tmp_path}/sub/a.json"):
        load(d, "a")


@pytest.mark.parametrize("name, text, line", [
    ("a.json", '[\n{"instruction": "x", "output": "y"},\n{"instruction": "x" "output": "y"}\n]', 3),
    ("a.jsonl", '{"instruction": "x", "output": "y"}\n\n{"instruction": oops}\n', 3),
])
def test_malformed_json_names_file_and_line(tmp_path, name, text, line):
    d = make_data(tmp_path, {name: text}, {"a": {"file_name": name}})
    with pytest.raises(TunelabError, match=f"{name}:{line}: malformed JSON"):
        load(d, "a")


def test_mapped_column_absent_names_it_and_the_keys_present(tmp_path):
    d = make_data(tmp_path, {"a.json": rows(2)}, {"a": {"file_name": "a.json", "columns": ALPACA_HISTORY}})
    with pytest.raises(TunelabError, match=r"column 'history' \(history\) is in no row; .*input, instruction, output"):
        load(d, "a")


def test_all_rows_empty_is_an_error(tmp_path):
    d = make_data(tmp_path, {"a.json": [{"instruction": "", "input": "", "output": "x"},
                                        {"instruction": "q", "input": "", "output": " "}]},
                  {"a": {"file_name": "a.json"}})
    with pytest.raises(TunelabError, match="gives no examples: all 2 rows read have an empty prompt or response"):
        load(d, "a")


def test_sha1_mismatch_only_warns(tmp_path, caplog):
    d = make_data(tmp_path, {"a.json": rows(3)}, {"a": {"file_name": "a.json", "file_sha1": "0" * 40}})
    with caplog.at_level(logging.WARNING, logger="tunelab.data"):
        examples, _ = load(d, "a")
    assert len(examples) == 3
    assert "sha1 of" in caplog.text and "0" * 40 in caplog.text


@pytest.mark.parametrize("entry", [{"hf_hub_url": "tatsu-lab/alpaca"}, {"script_url": "belle_multiturn"}])
def test_hub_and_script_entries_are_refused_offline(tmp_path, entry):
    d = make_data(tmp_path, {}, {"a": entry})
    with pytest.raises(TunelabError, match=f"tunelab never downloads at run time; put the file in {tmp_path} "
                                           "and use file_name"):
        load(d, "a")


@pytest.mark.parametrize("entry, message", [
    ({"file_name": "a.json", "file_sha": "x"}, "unknown key 'file_sha': did you mean file_sha1"),
    ({"file_name": "a.json", "formatting": "sharegtp"}, "did you mean sharegpt"),
    ({"file_name": "a.json", "columns": {"promt": "instruction"}}, "unknown column role 'promt'"),
    ({"file_name": "a.json", "rows": [0]}, r"rows must be \[start, end\] or \[start, end, step\]"),
    ({"file_name": "a.json", "rows": [0, None, 0]}, r"step > 0"),
])
def test_bad_registry_entries_name_the_valid_choices(tmp_path, entry, message):
    d = make_data(tmp_path, {"a.json": rows(1)}, {"a": entry})
    with pytest.raises(TunelabError, match=message):
        load(d, "a")


# ---------------------------------------------------------------- 2023 row semantics

def test_max_samples_applies_to_each_set_before_concatenation(tmp_path):
    d = make_data(tmp_path, {"a.json": rows(5, "a"), "b.json": rows(5, "b")},
                  {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}})
    examples, stats = load(d, "a,b", max_samples=2)
    assert [e.prompt for e in examples] == ["a0", "a1", "b0", "b1"]
    assert stats.to_dict() == {"a": {"loaded": 2, "kept": 2, "skipped_empty": 0},
                               "b": {"loaded": 2, "kept": 2, "skipped_empty": 0}}


def test_empty_rows_are_skipped_and_counted(tmp_path):
    data = rows(4)
    data[1]["output"] = ""
    data[2]["instruction"] = ""          # no prompt text at all
    data.append({"instruction": "", "input": "only input", "output": "kept"})  # query alone is enough
    d = make_data(tmp_path, {"a.json": data}, {"a": {"file_name": "a.json"}})
    examples, stats = load(d, "a")
    assert [e.response for e in examples] == ["a0", "a3", "kept"]
    assert stats.to_dict()["a"] == {"loaded": 5, "kept": 3, "skipped_empty": 2}
    assert "a: 5 loaded, 3 kept, 2 skipped (empty)" in stats.summary()


def test_max_samples_counts_empty_rows_like_2023(tmp_path):
    data = rows(4)
    data[0]["output"] = ""
    d = make_data(tmp_path, {"a.json": data}, {"a": {"file_name": "a.json"}})
    examples, _ = load(d, "a", max_samples=2)   # first 2 rows, then the empty one is dropped
    assert [e.prompt for e in examples] == ["q1"]


TWO_ROWS = [{"instruction": "q0", "input": "", "output": "a0"}, {"instruction": "q1", "input": "in1", "output": "a1"}]
CSV = 'instruction,input,output\nq0,,a0\nq1,in1,a1\n'
JSONL = "".join(json.dumps(r) + "\n" for r in TWO_ROWS)


@pytest.mark.parametrize("name, text", [("a.csv", CSV), ("a.jsonl", JSONL), ("a.json", JSONL),
                                        ("a.json", json.dumps(TWO_ROWS, indent=2))])
def test_json_jsonl_csv_give_the_same_examples(tmp_path, name, text):
    d = make_data(tmp_path, {name: text}, {"a": {"file_name": name}})
    examples, _ = load(d, "a")
    assert examples == [Example("q0", "", "a0"), Example("q1", "in1", "a1")]


def test_unsupported_extension(tmp_path):
    d = make_data(tmp_path, {"a.txt": "x"}, {"a": {"file_name": "a.txt"}})
    with pytest.raises(TunelabError, match="unsupported file type '.txt'"):
        load(d, "a")


def test_history_and_system_columns(tmp_path):
    data = [{"instruction": "q", "input": "", "output": "a", "history": [["h1", "r1"], ["h2", "r2"]], "persona": "P"}]
    info = {"a": {"file_name": "a.json", "columns": {**ALPACA_HISTORY, "system": "persona"}}}
    examples, _ = load(make_data(tmp_path, {"a.json": data}, info), "a")
    assert examples == [Example("q", "", "a", (("h1", "r1"), ("h2", "r2")), "P")]


def test_bad_history_is_an_error(tmp_path):
    data = [{"instruction": "q", "input": "", "output": "a", "history": [["only one"]]}]
    d = make_data(tmp_path, {"a.json": data}, {"a": {"file_name": "a.json", "columns": ALPACA_HISTORY}})
    with pytest.raises(TunelabError, match="row 0: history must be a list of"):
        load(d, "a")


def test_a_history_string_in_a_json_file_is_named_as_such(tmp_path):
    """Only CSV cells hold history as JSON text; in a JSON file a string is a wrong type, not malformed JSON."""
    data = [{"instruction": "q", "input": "", "output": "a", "history": "earlier chat"}]
    d = make_data(tmp_path, {"a.json": data}, {"a": {"file_name": "a.json", "columns": ALPACA_HISTORY}})
    with pytest.raises(TunelabError, match="row 0: history must be a list of .* pairs, got str 'earlier chat'"):
        load(d, "a")


def test_a_csv_history_cell_must_be_json(tmp_path):
    d = make_data(tmp_path, {"a.csv": 'instruction,output,history\nq,a,"[[""u"", ""r""]]"\nq2,a2,[oops\n'},
                  {"a": {"file_name": "a.csv", "columns": {"history": "history"}}})
    with pytest.raises(TunelabError, match="a.csv: row 1: the history cell is not JSON"):
        load(d, "a")


@pytest.mark.parametrize("name", ["a.json", "a.jsonl", "a.csv", "dataset_info.json"])
def test_non_utf8_bytes_name_file_line_and_offset(tmp_path, name):
    files = {"a.json": rows(2), "a.jsonl": JSONL, "a.csv": CSV}
    d = make_data(tmp_path, {k: v for k, v in files.items()}, {"a": {"file_name": name}})
    path = d / name
    path.write_bytes(path.read_bytes() + b"\n\xff")
    lines = path.read_bytes().count(b"\n") + 1
    with pytest.raises(TunelabError, match=f"{name}:{lines}: not UTF-8 text \\(byte 0xff at offset "):
        load(d, "a")


def test_sharegpt_from_value_and_role_content(tmp_path):
    conv1 = [{"from": "system", "value": "S"}, {"from": "human", "value": "u1"}, {"from": "gpt", "value": "g1"},
             {"from": "human", "value": "u2"}, {"from": "gpt", "value": "g2"}]
    conv2 = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    conv3 = [{"role": "user", "content": "no answer"}]
    data = [{"conversations": conv1}, {"conversations": conv2}, {"conversations": conv3}]
    info = {"s": {"file_name": "s.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}}}
    examples, stats = load(make_data(tmp_path, {"s.json": data}, info), "s")
    assert examples == [Example("u2", "", "g2", (("u1", "g1"),), "S"), Example("hi", "", "hello")]
    assert stats.to_dict()["s"] == {"loaded": 3, "kept": 2, "skipped_empty": 1}


def test_sharegpt_custom_tags_and_bad_order(tmp_path):
    data = [{"msgs": [{"who": "me", "text": "u"}, {"who": "bot", "text": "b"}]},
            {"msgs": [{"who": "bot", "text": "b"}]}]
    tags = {"role_tag": "who", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}
    info = {"s": {"file_name": "s.json", "formatting": "sharegpt", "columns": {"messages": "msgs"}, "tags": tags}}
    d = make_data(tmp_path, {"s.json": data}, info)
    assert load(d, "s", max_samples=1)[0] == [Example("u", "", "b")]
    with pytest.raises(TunelabError, match="row 1: turn 0 has role 'bot', expected user"):
        load(d, "s")


def test_identity_placeholders_are_filled():
    ex = Example("[NAME]?", "<NAME>", "I am {{name}} by {{author}} / <AUTHOR>", (("{{name}}", "<AUTHOR>"),), "<NAME>")
    assert fill_identity(ex, "Bot", "Lab") == Example("Lab?", "Bot", "I am Bot by Lab / Lab", (("Bot", "Lab"),), "Bot")


def test_identity_fills_come_from_the_options():
    examples, _ = load(DATA_DIR, "identity_en", identity_name="Yui", identity_author="Keio")
    assert examples[2].response == "I am Yui, an AI assistant developed by Keio. How can I assist you today?"
    assert not any("{{" in e.response for e in examples)


# ---------------------------------------------------------------- the shipped data/

SHIPPED = json.loads((DATA_DIR / "dataset_info.json").read_text(encoding="utf-8"))


def test_required_data_sets_are_registered():
    assert set(REQUIRED_NAMES) <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_data_set_loads_with_its_checksum(name, caplog):
    entry = SHIPPED[name]
    path = DATA_DIR / entry["file_name"]
    assert hashlib.sha1(path.read_bytes()).hexdigest() == entry["file_sha1"]
    with caplog.at_level(logging.WARNING, logger="tunelab.data"):
        examples, stats = load(DATA_DIR, name)
    assert "sha1" not in caplog.text
    assert examples and stats.sets[name].skipped_empty == 0
    assert not any(mark in e.response for e in examples for mark in ("[NAME]", "<NAME>", "{{name}}"))


def test_identity_en_is_all_the_english_rows_of_identity():
    def english(e):
        return not re.search(r"[\u4e00-\u9fff]", e.prompt + e.response)

    everything, _ = load(DATA_DIR, "identity")
    assert load(DATA_DIR, "identity_en")[0] == [e for e in everything if english(e)] == everything[:16]


def test_rows_range_selects_before_max_samples(tmp_path):
    d = make_data(tmp_path, {"a.json": rows(6)}, {"a": {"file_name": "a.json", "rows": [2, None]},
                                                 "b": {"file_name": "a.json", "rows": [1, 3]}})
    assert [e.prompt for e in load(d, "a", max_samples=3)[0]] == ["q2", "q3", "q4"]
    assert [e.prompt for e in load(d, "b")[0]] == ["q1", "q2"]
    d = make_data(tmp_path, {"a.json": rows(6)}, {"c": {"file_name": "a.json", "rows": [1, None, 2]}})
    assert [e.prompt for e in load(d, "c", max_samples=2)[0]] == ["q1", "q3"]  # a spread, then the first n


def test_alpaca_aux_set_is_the_rows_after_the_general_eval_rows():
    aux, _ = load(DATA_DIR, "alpaca_gpt4_en_aux")
    everything, _ = load(DATA_DIR, "alpaca_gpt4_en")
    assert aux == everything[100:]
    # the demo file repeats some rows: exactly one aux row (file row 610) equals an eval row (documented)
    assert [i for i, e in enumerate(aux, 100) if e in set(everything[:100])] == [610]


def test_persona_chat_en_rows_have_user2_persona_as_system():
    examples, _ = load(DATA_DIR, "persona_chat_en_test", max_samples=3)
    assert all(e.system.startswith("You are a person with this persona: ") for e in examples)
    assert examples[1].history == ((examples[0].prompt, examples[0].response),)


def test_persona_chat_converter_reproduces_the_shipped_files():
    path = DATA_DIR / "scripts" / "convert_persona_chat.py"
    spec = importlib.util.spec_from_file_location("convert_persona_chat", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    train, test = script.convert()
    assert script.TRAIN_FILE.read_text(encoding="utf-8") == script.dumps(train)
    assert script.TEST_FILE.read_text(encoding="utf-8") == script.dumps(test)


def test_data_folder_is_small_and_documented():
    files = [p for p in DATA_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < 6_000_000
    readme = (DATA_DIR / "README.md").read_text(encoding="utf-8")
    for p in files:
        assert p.name in readme, f"data/README.md does not mention {p.name}"
    for name in SHIPPED:
        assert f"`{name}`" in readme, f"data/README.md does not list data set {name}"
