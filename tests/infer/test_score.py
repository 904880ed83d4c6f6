"""`tunesmith score`: LLaMA-Factory's bleu-4 / rouge-1/2/l on English and Chinese, exact match, choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.errors import DataError
from tunesmith.infer.metrics import bleu4, choice_letter, fallback_tokens, segmenter_name
from tunesmith.infer.score import Fields, score_file

# (prediction, reference): English, Chinese, mixed, empty, blank lines, sentence breaks, choices
PAIRS = [
    ("The capital is Paris.", "The capital is Paris."),
    ("The capital is Rome. Thanks.", "The capital is Paris."),
    ("Making crepes is easy: mix flour, eggs and milk, then cook.", "Crepes are easy to make: whisk flour, eggs, milk."),
    ("", "Something to say."),
    ("Answer with nothing", ""),
    ("中国的首都是北京。", "北京是中国的首都。"),
    ("我爱北京天安门！天安门上太阳升。", "我爱北京天安门，天安门上太阳升。"),
    ("Python 是一种编程语言, used by 数据科学家.", "Python是一种广泛使用的编程语言。"),
    ("line one\n\nline two?\nline three......and more", "line one\nline two? line three"),
    ("B", "B"),
    ("The answer is (C) because ...", "D. Oslo"),
    ("A good guess: E", "E"),
    ("“你好？”他问道。……嗯……好的", "你好？他问。好的"),
]  # fmt: skip


def write(path: Path, pairs=PAIRS) -> Path:
    recs = [{"id": f"s{i}", "predict": p, "label": r, "extra": {"gold": r}} for i, (p, r) in enumerate(pairs)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def llamafactory_scores(pred: str, label: str) -> dict[str, float]:
    """llamafactory/train/sft/metric.py ComputeSimilarity, one pair (jieba + rouge_chinese + nltk)."""
    jieba = pytest.importorskip("jieba")
    rouge_chinese = pytest.importorskip("rouge_chinese")
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = rouge_chinese.Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    out = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    b = bleu.sentence_bleu([list(label)], list(pred), smoothing_function=bleu.SmoothingFunction().method3)
    return out | {"bleu-4": round(b * 100, 4)}


def test_same_numbers_as_llamafactory_per_sample_and_averaged(tmp_path: Path) -> None:
    if not segmenter_name().startswith("jieba"):
        pytest.skip("jieba is not installed: Chinese segmentation differs from LLaMA-Factory's by design")
    result = score_file(write(tmp_path / "predictions.jsonl"))
    per = [json.loads(line) for line in result.scores_path.read_text().splitlines()]
    assert [p["id"] for p in per] == [f"s{i}" for i in range(len(PAIRS))]
    expected = [llamafactory_scores(p, r) for p, r in PAIRS]
    for mine, ref, pair in zip(per, expected, PAIRS):
        for k, v in ref.items():
            assert mine[k] == pytest.approx(v, abs=0.01), (k, pair)
    for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert result.summary[k] == pytest.approx(sum(e[k] for e in expected) / len(PAIRS), abs=0.01)
    assert json.loads(result.summary_path.read_text())["samples"] == len(PAIRS)


def test_fixed_values_without_reference_libraries() -> None:
    # computed once with nltk 3.10 sentence_bleu(method3) on characters; holds without nltk installed
    assert bleu4("The capital is Paris.", "The capital is Paris.") == pytest.approx(1.0)
    assert round(bleu4("The capital is Rome. Thanks.", "The capital is Paris.") * 100, 4) == pytest.approx(
        54.1082, abs=1e-4
    )
    assert round(bleu4("中国的首都是北京。", "北京是中国的首都。") * 100, 4) == pytest.approx(
        54.6633, abs=1e-4
    )
    assert bleu4("", "x") == 0.0 and bleu4("xyz", "abc") == 0.0


def test_exact_match_and_choice_accuracy(tmp_path: Path) -> None:
    result = score_file(write(tmp_path / "p.jsonl"))
    per = {p["id"]: p for p in map(json.loads, result.scores_path.read_text().splitlines())}
    assert per["s0"]["exact_match"] == 100.0 and per["s1"]["exact_match"] == 0.0
    assert per["s9"]["choice"] == {"predict": "B", "label": "B", "correct": True}
    assert per["s10"]["choice"] == {"predict": "C", "label": "D", "correct": False}
    assert per["s11"]["choice"] == {"predict": "E", "label": "E", "correct": True}
    assert per["s0"]["choice"]["label"] is None  # no choice in the reference: not counted
    assert result.summary["choice_samples"] == 3
    assert result.summary["choice_accuracy"] == pytest.approx(200 / 3)
    assert result.summary["exact_match"] == pytest.approx(200 / len(PAIRS))
    assert [choice_letter(t) for t in ("A cat sat.", "(A) yes", "答案：C", "none")] == [None, "A", "C", None]


def test_field_options_parallel_equals_serial_and_errors(tmp_path: Path) -> None:
    many = write(tmp_path / "many.jsonl", PAIRS * 20)
    serial = score_file(many, workers=1)
    serial_lines = serial.scores_path.read_bytes()
    parallel = score_file(many, workers=2, chunk=50)
    assert parallel.scores_path.read_bytes() == serial_lines
    assert {k: parallel.summary[k] for k in ("bleu-4", "rouge-l")} == {
        k: serial.summary[k] for k in ("bleu-4", "rouge-l")
    }
    gold = score_file(many, Fields(label="extra.gold"), workers=1)
    assert gold.summary["rouge-1"] == serial.summary["rouge-1"]
    with pytest.raises(DataError, match="extra.missing"):
        score_file(many, Fields(label="extra.missing"))


def test_fallback_segmentation_splits_cjk_by_character() -> None:
    assert fallback_tokens("Python 是语言, naïve!") == [
        "Python",
        " ",
        "是",
        "语",
        "言",
        ",",
        " ",
        "naïve",
        "!",
    ]
