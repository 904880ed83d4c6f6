"""`tunesmith chat CONFIG`: a terminal chat with streaming answers and history.

Commands: /clear (forget the history), /system TEXT (set the system prompt; /system alone shows it,
/system - removes it), /settings, /help, /exit (or Ctrl-D). LLaMA-Factory's bare `clear` and `exit`
work too. Multi-line input: end a line with a backslash to continue it, or wrap a block in triple quotes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from tunesmith.data.types import Message
from tunesmith.infer.engine import Engine
from tunesmith.infer.settings import SamplingSettings

HELP = """commands:
  /clear          forget the conversation so far
  /system TEXT    set the system prompt (/system alone shows it, /system - removes it)
  /settings       show the generation settings
  /exit           quit (also Ctrl-D)
multi-line input: end a line with \\ to continue it, or put the text between two lines of \"\"\"."""


@dataclass
class ChatSession:
    """The conversation state behind the terminal (usable without one: see ``reply``)."""

    engine: Engine
    settings: SamplingSettings
    system: str = ""
    history: list[Message] = field(default_factory=list)

    def messages(self, user: str) -> list[Message]:
        head = [Message(role="system", content=self.system)] if self.system else []
        return [*head, *self.history, Message(role="user", content=user)]

    def reply(self, user: str) -> Iterator[str]:
        """Stream the answer to ``user``; the turn joins the history once the answer is complete."""
        prompt = self.engine.prompt_ids(self.messages(user))
        final = None
        for event in self.engine.stream(prompt, self.settings):
            if event.text:
                yield event.text
            if event.completion is not None:
                final = event.completion
        if final is not None:
            self.history += [
                Message(role="user", content=user),
                Message(role="assistant", content=final.text),
            ]


def read_message(read: Callable[[str], str]) -> str | None:
    """One user message from ``read`` (like ``input``): continuation lines and triple-quote blocks."""
    try:
        line = read("\nUser: ")
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                more = read("... ")
            except EOFError:
                break
            if more.strip() == '"""':
                break
            lines.append(more)
        return "\n".join(lines)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        try:
            line = read("... ")
        except EOFError:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


def run_chat(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """The terminal loop; returns the exit code."""
    out.write(f"tunesmith chat: {session.engine.name} ({session.settings.describe()})\n{HELP}\n")
    while True:
        text = read_message(read)
        if text is None or text.strip() in ("/exit", "/quit", "exit"):
            out.write("\n")
            return 0
        command = text.strip()
        if command in ("/clear", "clear"):
            session.history.clear()
            out.write("History cleared.\n")
            continue
        if command == "/help":
            out.write(HELP + "\n")
            continue
        if command == "/settings":
            out.write(session.settings.describe() + "\n")
            continue
        if command.startswith("/system"):
            value = command[len("/system") :].strip()
            if value == "-":
                session.system = ""
            elif value:
                session.system = value
            out.write(f"System prompt: {session.system or '(none)'}\n")
            continue
        if not command:
            continue
        out.write("Assistant: ")
        for piece in session.reply(text):
            out.write(piece)
            out.flush()
        out.write("\n")


def chat(cfg: Any, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Load the configured model and chat in the terminal."""
    from tunesmith.infer.engine import load_engine

    engine = load_engine(cfg)
    settings = SamplingSettings.from_config(cfg)
    # the template already carries default_system: no system message unless /system sets one
    return run_chat(ChatSession(engine, settings), read, out)


__all__ = ["ChatSession", "chat", "read_message", "run_chat"]
