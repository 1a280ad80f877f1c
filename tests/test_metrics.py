"""The 2023 BLEU-4 / ROUGE formula (tunelab/metrics.py), checked against values worked out by hand or by an
independent re-calculation written here, plus the predictions reader and the `tunelab score` command."""

import json
import math
import time
from collections import Counter

import pytest

from tunelab.hparams import TunelabError
from tunelab.metrics import METRIC_KEYS, main, read_predictions, score_corpus, score_pair


def _rouge_f(p: float, r: float) -> float:
    """rouge_chinese's F (with its +1e-8), x100, rounded as the 2023 code did."""
    return round(2 * p * r / (p + r + 1e-8) * 100, 4)


def _char_bleu4(pred: str, label: str) -> float:
    """Plain BLEU-4 on characters for a pair with at least one match at every order (so nltk's smoothing
    never applies) and len(pred) >= len(label) (so the brevity penalty is 1): geometric mean of clipped
    n-gram precisions. Written from the BLEU definition, independently of nltk."""
    logs = []
    for n in range(1, 5):
        hyp = Counter(pred[i:i + n] for i in range(len(pred) - n + 1))
        ref = Counter(label[i:i + n] for i in range(len(label) - n + 1))
        clipped = sum(min(count, ref[gram]) for gram, count in hyp.items())
        assert clipped > 0
        logs.append(math.log(clipped / sum(hyp.values())))
    assert len(pred) >= len(label)
    return round(math.exp(sum(logs) / 4) * 100, 4)


def test_identical_texts_score_100():
    # >= 4 characters so every n-gram order matches; ROUGE's 99.9999995 rounds to 100.0
    for text in ("今天天气很好", "The weather is nice today."):
        assert score_pair(text, text) == {key: 100.0 for key in METRIC_KEYS}


def test_chinese_partial_overlap():
    import jieba

    # the ROUGE numbers below assume this segmentation (jieba's default dictionary)
    assert list(jieba.cut("我喜欢吃苹果")) == ["我", "喜欢", "吃", "苹果"]
    assert list(jieba.cut("我喜欢吃香蕉")) == ["我", "喜欢", "吃", "香蕉"]
    scores = score_pair("我喜欢吃苹果", "我喜欢吃香蕉")
    # BLEU on 6 vs 6 characters: 1-grams 4/6, 2-grams 3/5 (我喜 喜欢 欢吃), 3-grams 2/4, 4-grams 1/3
    assert scores["bleu-4"] == round((4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25 * 100, 4) == 50.8133
    # words: 3 of 4 unigrams shared, 2 of 3 bigrams shared, LCS 我 喜欢 吃 = 3 of 4
    assert scores["rouge-1"] == _rouge_f(3 / 4, 3 / 4) == 75.0
    assert scores["rouge-2"] == _rouge_f(2 / 3, 2 / 3) == 66.6667
    assert scores["rouge-l"] == _rouge_f(3 / 4, 3 / 4) == 75.0


def test_english_words():
    pred, label = "the cat sat on the mat", "the cat is on the mat"
    scores = score_pair(pred, label)
    assert scores["bleu-4"] == _char_bleu4(pred, label) == 78.392
    # ROUGE n-grams are *sets*: pred unigrams {the cat sat on mat}, label {the cat is on mat} -> 4 of 5
    assert scores["rouge-1"] == _rouge_f(4 / 5, 4 / 5) == 80.0
    # bigrams: (the cat) (on the) (the mat) shared, 3 of 5 on each side
    assert scores["rouge-2"] == _rouge_f(3 / 5, 3 / 5) == 60.0
    # LCS "the cat on the mat" = 5 of 6 words on each side
    assert scores["rouge-l"] == _rouge_f(5 / 6, 5 / 6) == 83.3333


def test_short_exact_answer_is_capped_by_smoothed_bleu():
    # 2 characters: 1- and 2-gram precision 1, the empty 3/4-gram orders become 1/2 and 1/4 (method3),
    # so BLEU-4 = (1 * 1 * 1/2 * 1/4) ** (1/4). One jieba word: no bigram, so ROUGE-2 is 0.
    assert score_pair("你好", "你好") == {
        "bleu-4": round(0.125 ** 0.25 * 100, 4), "rouge-1": 100.0, "rouge-2": 0.0, "rouge-l": 100.0}


@pytest.mark.parametrize("pred,label", [("", "你好世界"), ("你好世界", ""), ("", ""),
                                        ("   ", "abc"), ("abc", " \n\t")])
def test_empty_or_blank_side_scores_zero(pred, label):
    assert score_pair(pred, label) == {key: 0.0 for key in METRIC_KEYS}


def test_blank_sides_get_rouge_zero_but_bleu_counts_whitespace():
    # ROUGE has no token to compare -> 0; BLEU is on raw characters (2023), and "\n" matches "\n":
    # a 1-character exact match, (1 * 1/2 * 1/4 * 1/8) ** (1/4) after method3 smoothing
    assert score_pair("\n", "\n") == {
        "bleu-4": round((1 / 64) ** 0.25 * 100, 4), "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_punctuation_counts_as_tokens():
    # 3 characters, all orders up to 3 match, the empty 4-gram order becomes 1/2: BLEU = (1/2) ** (1/4)
    assert score_pair("，。！", "，。！") == {
        "bleu-4": round(0.5 ** 0.25 * 100, 4), "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    assert score_pair("！！！", "你好") == {key: 0.0 for key in METRIC_KEYS}


def test_corpus_is_mean_of_rounded_pair_scores():
    corpus = score_corpus(["我喜欢吃苹果", "今天天气很好"], ["我喜欢吃香蕉", "今天天气很好"])
    # rouge-2: (66.6667 + 100) / 2 — per-pair rounding happens before the mean, as in 2023
    assert corpus == pytest.approx({"bleu-4": (50.8133 + 100) / 2, "rouge-1": 87.5,
                                    "rouge-2": 83.33335, "rouge-l": 87.5}, abs=1e-9)
    assert list(corpus) == list(METRIC_KEYS)


def test_corpus_errors():
    with pytest.raises(TunelabError, match="no predictions"):
        score_corpus([], [])
    with pytest.raises(TunelabError, match="2 predictions but 1"):
        score_corpus(["a", "b"], ["a"])


def test_score_100_samples_is_fast():
    score_pair("预热", "预热")  # jieba's one-off dictionary load is not what we time
    preds = ["凉宫春日：我对普通的人类没有兴趣！如果你们之中有外星人的话，就尽管来找我吧！"] * 50 + \
            ["Eat well, sleep well, and exercise regularly to stay healthy."] * 50
    labels = ["我对普通人没有兴趣。外星人、未来人、超能力者，就来找我吧！以上。"] * 50 + \
             ["Three tips: eat a balanced diet, exercise, and sleep enough."] * 50
    start = time.perf_counter()
    score_corpus(preds, labels)
    assert time.perf_counter() - start < 1.0


def _write(path, lines):
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def test_read_predictions_jsonl_and_2023_txt(tmp_path):
    rows = [{"prompt": "p", "predict": "答\u2028案", "label": "答案"}, {"label": "b", "predict": "a"}]
    jsonl = _write(tmp_path / "generated_predictions.jsonl",
                   [json.dumps(r, ensure_ascii=False) for r in rows] + [""])
    assert read_predictions(jsonl) == (["答\u2028案", "a"], ["答案", "b"])
    # 2023's .txt: label first, no prompt, no trailing newline
    txt = _write(tmp_path / "generated_predictions.txt", ['{"label": "x", "predict": "y"}'])
    assert read_predictions(txt) == (["y"], ["x"])


@pytest.mark.parametrize("lines,message", [
    (['{"predict": "a", "label": "b"}', "{oops"], r"bad\.jsonl line 2: not a JSON object"),
    (['{"predict": "a"}'], r"line 1: missing 'label'"),
    (['["a", "b"]'], r"line 1: expected a JSON object"),
    (['{"predict": null, "label": "b"}'], r"line 1: 'predict' must be a string"),
    (["", "  "], r"no predictions"),
])
def test_read_predictions_errors(tmp_path, lines, message):
    with pytest.raises(TunelabError, match=message):
        read_predictions(_write(tmp_path / "bad.jsonl", lines))


def test_read_predictions_missing_file(tmp_path):
    with pytest.raises(TunelabError, match="not found"):
        read_predictions(tmp_path / "nope.jsonl")


def test_score_command_prints_and_writes_json(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [json.dumps({"predict": "我喜欢吃苹果", "label": "我喜欢吃香蕉"})])
    b = _write(tmp_path / "b.jsonl", [json.dumps({"predict": "今天天气很好", "label": "今天天气很好"})] * 2)
    out = tmp_path / "scores.json"
    assert main([str(a), str(b), "--output", str(out)]) == 0
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved[str(a)] == {"bleu-4": 50.8133, "rouge-1": 75.0, "rouge-2": 66.6667, "rouge-l": 75.0, "samples": 1}
    assert saved[str(b)]["samples"] == 2 and saved[str(b)]["rouge-l"] == 100.0
    printed = capsys.readouterr().out
    assert f"{a}  (1 samples)" in printed and "bleu-4     50.8133" in printed


def test_score_command_errors(tmp_path):
    a = _write(tmp_path / "a.jsonl", [json.dumps({"predict": "x", "label": "y"})])
    with pytest.raises(TunelabError, match="did you mean output"):
        main([str(a), "--outptu", "x.json"])
    with pytest.raises(TunelabError):
        main([])
    out = tmp_path / "scores.json"
    with pytest.raises(TunelabError, match="not found"):
        main([str(a), str(tmp_path / "missing.jsonl"), "--output", str(out)])
    assert not out.exists()  # nothing written when any file fails
