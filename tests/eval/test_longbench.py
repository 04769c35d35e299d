"""LongBench metrics against hand-computed values, and the loaders (original jsonl and MiniLongBench)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import SHARED
from tokensieve import presets
from tokensieve.eval import longbench as lb

MINI = SHARED / "data" / "longbench"
needs_mini = pytest.mark.skipif(not MINI.is_dir(), reason=f"{MINI} not found (../shared is not beside the repo)")


def test_qa_f1_hand_computed():
    # "the" is an article: normalised, "cat sat" vs "cat sat down": P = 1, R = 2/3, F1 = 0.8.
    assert lb.qa_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    # No articles: 2 common tokens out of 3 on each side, F1 = 2/3.
    assert lb.qa_f1("black cat sat", "cat sat down") == pytest.approx(2 / 3)
    assert lb.qa_f1("The Cat, sat!", "cat sat") == 1.0  # case and punctuation are normalised away
    assert lb.qa_f1("dog", "cat") == 0.0
    assert lb.normalize_answer("The  Answer, is: an apple.") == "answer is apple"


def test_chinese_qa_f1_by_jieba_words():
    pytest.importorskip("jieba")
    # jieba keeps 北京大学 whole: ["北京大学"] vs ["北京"] share no word, F1 = 0 (by characters it was
    # 2 of 4 and 2 of 2: P = 1/2, R = 1, F1 = 2/3).
    assert lb.zh_words("北京大学") == ["北京大学"] and lb.qa_f1_zh("北京大学", "北京") == 0.0
    # ["我", "在", "北京大学", "读书"] vs ["我", "在", "北京", "读书"]: 3 common of 4 each side, F1 = 3/4
    # (by characters: 6 common, P = 6/8, R = 6/6, F1 = 6/7).
    assert lb.qa_f1_zh("我在北京大学读书", "我在北京读书") == pytest.approx(3 / 4)
    # ["北京", "是", "首都"] vs ["首都北京"] (one word for jieba): nothing in common (by characters: 8/9).
    assert lb.qa_f1_zh("北京是首都", "首都北京") == 0.0
    # ["北京", "。"]: the punctuation word normalises to "" and is dropped.
    assert lb.zh_words("北京。") == ["北京"] and lb.qa_f1_zh("北京。", "北京") == 1.0
    assert lb.zh_words("Hello World 北京大学!") == ["hello", "world", "北京大学"]  # spaces and "!" dropped
    # Rouge-L: ["今天天气", "很", "好"] vs ["今天", "很", "好"], LCS 2 ("很 好"): P = R = 2/3, F1 = 2/3
    # (0.8 over characters: see the fallback test).
    assert lb.rouge_l_zh("今天天气很好", "今天很好") == pytest.approx(2 / 3)


def test_chinese_metrics_fall_back_to_characters_with_one_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # `import jieba` raises ImportError
    monkeypatch.setattr(lb, "_word_cutter", None)  # as if no Chinese metric ran yet in this process
    with pytest.warns(UserWarning, match=r"jieba is not installed.*tokensieve\[zh\]") as caught:
        # 5 predicted characters, 4 reference characters, all 4 shared: P = 4/5, R = 1, F1 = 8/9.
        assert lb.qa_f1_zh("北京是首都", "首都北京") == pytest.approx(8 / 9)
        assert lb.qa_f1_zh("北京大学", "北京") == pytest.approx(2 / 3)  # P = 2/4, R = 2/2
        # LCS of 今天天气很好 / 今天很好 is 4 characters: P = 4/6, R = 1, F1 = 0.8.
        assert lb.rouge_l_zh("今天天气很好", "今天很好") == pytest.approx(0.8)
        assert lb.zh_words("北京。") == ["北", "京"]
    assert len([w for w in caught if "jieba" in str(w.message)]) == 1  # once, not once per call


def test_rouge_l_hand_computed():
    # LCS of "the cat sat on the mat" and "the cat lay on the mat" is 5 of 6 words each side.
    assert lb.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS("a b c d", "a c e") = 2 ("a c"): P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
    assert lb.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert lb.longest_common_subsequence("ABCBDAB", "BDCABA") == 4


def test_edit_similarity_hand_computed():
    # kitten / sitting: LCS "ittn" = 4, so 2 * 4 / (6 + 7) = 8/13.
    assert lb.edit_similarity("kitten", "sitting") == pytest.approx(8 / 13)
    assert lb.edit_similarity("abc", "abc") == 1.0 and lb.edit_similarity("abc", "xyz") == 0.0
    # The first line of code counts; fences and comments are skipped.
    assert lb.code_similarity("```python\n# next line\n    x = 1\ny = 2", "    x = 1") == 1.0


def test_classification_retrieval_count():
    classes = ["Date", "Date of birth", "City"]
    assert lb.classification("Date of birth", "Date of birth", all_classes=classes) == 1.0
    assert lb.classification("Date or City", "Date", all_classes=classes) == 0.5
    assert lb.classification("City", "Date", all_classes=classes) == 0.0
    assert lb.retrieval("Paragraph 3, or maybe 4", "Paragraph 3") == 0.5
    assert lb.retrieval("段落5", "段落5") == 1.0
    assert lb.retrieval("I cannot tell", "Paragraph 3") == 0.0
    assert lb.count("There are 12 paragraphs.", "12") == 1.0
    assert lb.count("12 or 13", "12") == 0.5
    with pytest.raises(ValueError, match="all_classes"):
        lb.classification("Date", "Date")


def test_score_takes_best_answer_and_first_line_for_few_shot():
    assert lb.score("hotpotqa", "Bob Dylan", ["Robert Zimmerman", "Bob Dylan"]) == 1.0
    assert lb.score("triviaqa", "55\nQuestion: what else", ["55"]) == 1.0  # only the first line counts
    assert lb.score("hotpotqa", "55\nQuestion: what else", ["55"]) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="unknown LongBench task"):
        lb.score("nope", "x", ["x"])


def test_original_jsonl_loader(tmp_path):
    records = [
        dict(input="Who wrote it?", context="It was written by Ann.", answers=["Ann"], length=5, dataset="hotpotqa",
             language="en", all_classes=None, _id="a"),
        dict(input="What kind?", context="Q: When? Type: Date", answers=["Date"], length=4, dataset="trec",
             language="en", all_classes=["Date", "City"], _id="b"),
    ]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    samples = lb.load_longbench(tmp_path)
    assert sorted(samples) == ["hotpotqa", "trec"]
    qa = samples["hotpotqa"][0]
    assert "It was written by Ann." in qa.prompt() and "Who wrote it?" in qa.prompt()
    assert qa.turns[0].answers == ("Ann",) and qa.max_new_tokens == 32
    assert qa.score(0, "Ann") == 1.0 and qa.score(0, "Bob") == 0.0
    trec = samples["trec"][0]
    assert trec.all_classes == ("Date", "City") and trec.score(0, "Date") == 1.0
    assert list(lb.load_longbench(path, tasks=["trec"])) == ["trec"]
    with pytest.raises(ValueError, match="no LongBench samples"):
        lb.load_longbench(path, tasks=["qasper"])


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        lb.load_longbench(tmp_path / "missing")
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text(json.dumps({"input": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="lacks context"):
        lb.load_longbench(path)


@needs_mini
def test_minilongbench_files_load_and_gold_answers_score_full_marks():
    samples = lb.load_longbench(MINI)
    assert len(samples) == 21 and sum(len(s) for s in samples.values()) == 237
    assert samples["trec"][0].all_classes and samples["lsht"][0].all_classes
    for task, items in samples.items():
        for sample in items:
            assert sample.context and sample.turns[0].answers
            gold = sample.turns[0].answers[0]
            assert sample.score(0, gold) == pytest.approx(1.0), (task, gold)


def test_truncate_middle_keeps_head_and_tail():
    tok = presets.byte_tokenizer()
    prompt = "HEAD" + "x" * 1000 + "TAIL"
    cut = lb.truncate_middle(tok, prompt, 100)
    assert cut.startswith("HEAD") and cut.endswith("TAIL") and len(cut) == 100
    assert lb.truncate_middle(tok, "short", 100) == "short"
