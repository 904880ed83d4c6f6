"""k-shot multiple-choice prompts as conversations, rendered through the run's chat template.

The wording is LLaMA-Factory's (``eval/template.py``), so scores compare with its ``llamafactory-cli
eval``: each example is a user turn ``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` and its answer
letter an assistant turn; the subject header ("The following are multiple choice questions ...") opens
the FIRST user turn, as LLaMA-Factory writes it, so the template's own default system prompt stays
as it is. The final question's turn ends with the generation prompt; the model's next token is read.
Shots are the first ``n_shot`` questions of the subject's dev split (deterministic; LLaMA-Factory
draws them at random), and are dropped from the earliest when the prompt is over ``cutoff_len``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunesmith.data.types import Message
from tunesmith.evaluation.benchmark import CHOICES, Question


@dataclass(frozen=True)
class Wording:
    header: str  # formatted with {subject}
    choice: str  # formatted with {choice}, {content}
    answer: str


WORDINGS = {
    "en": Wording(
        "The following are multiple choice questions (with answers) about {subject}.\n\n",
        "\n{choice}. {content}",
        "\nAnswer:",
    ),
    "zh": Wording(
        "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
        "\n{choice}. {content}",
        "\n答案：",
    ),
}


@dataclass(frozen=True)
class Prompt:
    """The token ids of one question's prompt and how it was fitted to cutoff_len."""

    question: Question
    input_ids: list[int]
    shots: int  # shots kept
    pool: int  # shots it would get without cutoff_len: min(n_shot, dev questions)
    cut: int  # tokens cut from the start because even the 0-shot prompt was too long


def question_text(q: Question, wording: Wording) -> str:
    """``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:``."""
    options = "".join(wording.choice.format(choice=c, content=t) for c, t in zip(CHOICES, q.choices))
    return q.question + options + wording.answer


def build_messages(subject_name: str, shots: Sequence[Question], q: Question, lang: str) -> list[Message]:
    """The conversation of one question: shots as user/assistant pairs, then the question's user turn."""
    wording = WORDINGS[lang]
    messages: list[Message] = []
    for shot in shots:
        messages.append({"role": "user", "content": question_text(shot, wording)})
        messages.append({"role": "assistant", "content": shot.answer})
    messages.append({"role": "user", "content": question_text(q, wording)})
    messages[0] = {
        "role": "user",
        "content": wording.header.format(subject=subject_name) + messages[0]["content"],
    }
    return messages


def shot_pool(shots: Sequence[Question], q: Question, n_shot: int) -> list[Question]:
    """The first n_shot dev questions, never the question itself (when the dev split is evaluated)."""
    return [s for s in shots if (s.where.file, s.index) != (q.where.file, q.index)][:n_shot]


def encode_text(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered texts, as ``apply_chat_template`` tokenizes them (no added special tokens)."""
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def build_prompts(
    questions: Sequence[tuple[str, Sequence[Question], Question]],
    *,
    template: Any,
    tokenizer: Any,
    n_shot: int,
    lang: str,
    cutoff_len: int,
    enable_thinking: bool | None = None,
    answer_prefix: Sequence[int] = (),
) -> list[Prompt]:
    """Prompt ids of (subject name, dev shots, question) triples, each within cutoff_len tokens.

    ``answer_prefix``: tokens the answer starts with before its letter (``ChoiceTokens.prefix``), appended.
    """

    def render(name: str, shots: Sequence[Question], q: Question) -> str:
        messages = build_messages(name, shots, q, lang)
        return template.render(messages, add_generation_prompt=True, enable_thinking=enable_thinking).text

    pools = [shot_pool(shots, q, n_shot) for _, shots, q in questions]
    tail = list(answer_prefix)
    ids = [
        e + tail for e in encode_text(tokenizer, [render(n, p, q) for (n, _, q), p in zip(questions, pools)])
    ]
    prompts = []
    for (name, _, q), pool, first in zip(questions, pools, ids):
        k, current = len(pool), first
        while len(current) > cutoff_len and k > 0:
            k -= 1
            current = encode_text(tokenizer, [render(name, pool[len(pool) - k :], q)])[0] + tail
        cut = max(0, len(current) - cutoff_len)
        # Cut from the start: the question and "Answer:" at the end are what the model must see.
        prompts.append(Prompt(q, current[cut:], k, len(pool), cut))
    return prompts
