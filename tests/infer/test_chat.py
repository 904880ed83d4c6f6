"""Terminal chat: streaming answers, history, /clear, /system, multi-line input, the CLI end to end."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tunesmith
from tunesmith.infer.chat import ChatSession, read_message, run_chat
from tunesmith.infer.engine import load_engine
from tunesmith.infer.settings import SamplingSettings

GREEDY = SamplingSettings(do_sample=False, max_new_tokens=24)


@pytest.fixture(scope="module")
def engine(trained_full: Path):
    cfg = tunesmith.load_config(None, [f"model_name_or_path={trained_full}", "template=qwen"])
    return load_engine(cfg)


def _lines(*lines: str):
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_multi_line_input() -> None:
    assert read_message(_lines("first \\", "second")) == "first \nsecond"
    assert read_message(_lines('"""', "a", "", "b", '"""')) == "a\n\nb"
    assert read_message(_lines()) is None


def test_a_session_answers_keeps_history_clears_and_sets_the_system_prompt(engine) -> None:
    session = ChatSession(engine, GREEDY)
    out = io.StringIO()
    code = run_chat(
        session,
        _lines(
            "Name the capital city number 1.",
            "/system You are terse.",
            "Name the capital city number 2.",
            "/clear",
            "/settings",
            "/exit",
        ),
        out,
    )
    text = out.getvalue()
    assert code == 0
    assert text.count("Assistant: The capital is") == 2
    assert "History cleared." in text and "System prompt: You are terse." in text and "greedy" in text
    assert session.history == [] and session.system == "You are terse."
    # the history and the system prompt reach the prompt the model sees
    session.history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "The capital is Rome."},
    ]
    rendered = engine.template.render(session.messages("next"), add_generation_prompt=True).text
    assert "You are terse." in rendered and "The capital is Rome." in rendered


def test_streamed_pieces_equal_the_whole_answer(engine) -> None:
    session = ChatSession(engine, GREEDY)
    question = "Name the capital city number 3."
    whole = engine.generate([engine.prompt_ids(session.messages(question))], GREEDY)[0][0].text
    pieces = list(session.reply(question))
    assert len(pieces) >= 2 and "".join(pieces) == whole == session.history[-1]["content"]


def test_the_cli_chats_over_stdin(trained_full: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(
        f"model_name_or_path: {trained_full}\ntemplate: qwen\ndo_sample: false\nmax_new_tokens: 24\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "chat", str(cfg)],
        input="Name the capital city number 0.\nexit\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Assistant: The capital is" in proc.stdout
    assert "greedy" in proc.stdout
