"""k-shot prompts: LLaMA-Factory's wording through the chat template (golden text), cutoff_len fitting."""

from __future__ import annotations

import pytest

from tunesmith.data.templates import get_template
from tunesmith.errors import Location
from tunesmith.evaluation.benchmark import Question
from tunesmith.evaluation.prompts import build_messages, build_prompts, shot_pool


def q(
    text: str, answer: str, index: int = 0, file: str = "dev.csv", choices=("w", "x", "y", "z")
) -> Question:
    return Question("s", index, text, tuple(choices), answer, Location(file, index + 1, index))


SHOTS = [q("1+1?", "B", 0, choices=("1", "2", "3", "4")), q("2+2?", "D", 1, choices=("1", "2", "3", "4"))]
TARGET = q("3+3?", "C", 0, "test.csv", choices=("3", "5", "6", "9"))

GOLDEN_EN = (
    "<|im_start|>user\nThe following are multiple choice questions (with answers) about arithmetic.\n\n"
    "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:<|im_end|>\n"
    "<|im_start|>assistant\nB<|im_end|>\n"
    "<|im_start|>user\n2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:<|im_end|>\n"
    "<|im_start|>assistant\nD<|im_end|>\n"
    "<|im_start|>user\n3+3?\nA. 3\nB. 5\nC. 6\nD. 9\nAnswer:<|im_end|>\n"
    "<|im_start|>assistant\n"
)
GOLDEN_ZH = (
    "<|im_start|>user\n以下是中国关于算术考试的单项选择题，请选出其中的正确答案。\n\n"
    "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：<|im_end|>\n"
    "<|im_start|>assistant\nB<|im_end|>\n"
    "<|im_start|>user\n2+2?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：<|im_end|>\n"
    "<|im_start|>assistant\nD<|im_end|>\n"
    "<|im_start|>user\n3+3?\nA. 3\nB. 5\nC. 6\nD. 9\n答案：<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.mark.parametrize(
    ("lang", "subject", "golden"), [("en", "arithmetic", GOLDEN_EN), ("zh", "算术", GOLDEN_ZH)]
)
def test_two_shot_prompt_golden_text(tiny_tokenizer, lang, subject, golden):
    template = get_template("chatml")
    text = template.render(build_messages(subject, SHOTS, TARGET, lang), add_generation_prompt=True).text
    assert text == golden
    [prompt] = build_prompts(
        [(subject, SHOTS, TARGET)],
        template=template,
        tokenizer=tiny_tokenizer,
        n_shot=2,
        lang=lang,
        cutoff_len=4096,
    )
    assert tiny_tokenizer.decode(prompt.input_ids) == golden
    assert (prompt.shots, prompt.pool, prompt.cut) == (2, 2, 0)


def test_zero_shot_puts_the_header_on_the_question_and_keeps_the_default_system(tiny_tokenizer):
    qwen = get_template("qwen")
    text = qwen.render(build_messages("arithmetic", [], TARGET, "en"), add_generation_prompt=True).text
    assert text.startswith(
        f"<|im_start|>system\n{qwen.default_system}<|im_end|>\n<|im_start|>user\nThe following"
    )


def test_shots_are_the_first_dev_questions_and_never_the_question_itself():
    dev = [q(f"d{i}", "A", i) for i in range(6)]
    assert [s.question for s in shot_pool(dev, TARGET, 5)] == ["d0", "d1", "d2", "d3", "d4"]
    assert [s.question for s in shot_pool(dev, dev[1], 3)] == ["d0", "d2", "d3"]  # evaluating the dev split
    assert shot_pool(dev[:2], TARGET, 5) == dev[:2]  # fewer when the dev split has fewer


def test_over_long_prompts_drop_the_earliest_shots_then_cut_from_the_start(tiny_tokenizer):
    template = get_template("chatml")
    dev = [q(f"first shot {i} " + "padding words " * 10, "A", i) for i in range(3)]

    def fit(cutoff: int):
        [p] = build_prompts(
            [("s", dev, TARGET)],
            template=template,
            tokenizer=tiny_tokenizer,
            n_shot=3,
            lang="en",
            cutoff_len=cutoff,
        )
        return p

    full = fit(4096)
    one_shot = fit(len(full.input_ids) - 1)
    assert (one_shot.shots, one_shot.pool, one_shot.cut) == (2, 3, 0)
    text = tiny_tokenizer.decode(one_shot.input_ids)
    assert "first shot 0" not in text and "first shot 1" in text and "first shot 2" in text
    assert text.index("The following") < text.index("first shot 1")  # the header moved to the new first turn
    tiny = fit(20)
    assert (tiny.shots, len(tiny.input_ids)) == (0, 20) and tiny.cut > 0
    assert tiny_tokenizer.decode(tiny.input_ids).endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")


def test_answer_prefix_is_appended_and_counted_in_the_cutoff(tiny_tokenizer):
    template = get_template("chatml")
    args = dict(template=template, tokenizer=tiny_tokenizer, n_shot=0, lang="en")
    [plain] = build_prompts([("s", [], TARGET)], cutoff_len=4096, **args)
    [prefixed] = build_prompts(
        [("s", [], TARGET)], cutoff_len=len(plain.input_ids), answer_prefix=[7], **args
    )
    assert prefixed.input_ids == plain.input_ids[1:] + [7] and prefixed.cut == 1
