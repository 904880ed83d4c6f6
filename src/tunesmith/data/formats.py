"""Records in alpaca / sharegpt / openai / text shape -> canonical Row (OpenAI-style messages).

Types are canonicalised here, before anything reaches Arrow: numbers and bools where text is expected
become str, objects and lists become JSON text, None for an optional field becomes "".
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import orjson

from tunesmith.data.registry import Columns, DatasetSpec, Tags
from tunesmith.data.types import Message, Record, Row, ToolCall
from tunesmith.errors import DataError, Location

# Machine codes of row-level problems (RowError.reason), used by the load report.
REASONS: tuple[str, ...] = (
    "missing_column", "empty_prompt", "empty_response", "empty_text", "bad_role_order", "unknown_role",
    "bad_type", "bad_tool_call",
)  # fmt: skip


class RowError(DataError):
    """One bad row; ``reason`` is a short machine code from REASONS, the message names file, line and field."""

    def __init__(
        self, where: Location | str, reason: str, message: str, field: str, expected: str | None = None
    ):
        super().__init__(where, message, field=field, expected=expected)
        self.reason = reason  # DataError stores the message text here; a row error stores its code
        self.detail = message


def to_row(record: Record, spec: DatasetSpec, *, require_response: bool = True) -> Row:
    """Convert one record to a canonical Row; raises RowError for a bad row.

    ``require_response=False`` accepts sft rows without a final assistant turn (prompt-only data).
    """
    conv = _Converter(record.data, record.where, spec, require_response)
    row = conv.alpaca() if spec.formatting == "alpaca" else conv.conversation()
    used = _used_columns(spec.columns)
    row["extra"] = {k: v for k, v in record.data.items() if k not in used}
    row["source"] = str(record.where)
    return row


@lru_cache(maxsize=64)
def _used_columns(columns: Columns) -> frozenset[str]:
    return frozenset(columns.used())


@lru_cache(maxsize=64)
def _role_map(t: Tags) -> dict[str, str]:
    """Data role tag -> canonical role ("function": a sharegpt function_call turn, made assistant later)."""
    return {t.user_tag: "user", t.assistant_tag: "assistant", t.observation_tag: "tool",
            t.function_tag: "function", t.system_tag: "system"}  # fmt: skip


class _Converter:
    """Holds one record's context so every helper can raise a RowError naming file, line and field."""

    def __init__(self, data: dict[str, Any], where: Location, spec: DatasetSpec, require_response: bool):
        self.data, self.where, self.spec, self.require_response = data, where, spec, require_response
        self.roles = _role_map(spec.tags)

    def error(self, reason: str, message: str, field: str, expected: str | None = None) -> RowError:
        return RowError(self.where, reason, message, field, expected)

    def get(self, column: str | None, required: bool = False) -> Any:
        if column is None:
            return None
        if column not in self.data:
            if required:
                raise self.error(
                    "missing_column", "column is missing", column, f"a record with key {column!r}"
                )
            return None
        return self.data[column]

    def text(self, value: Any, field: str) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float)):
            return str(value)
        if isinstance(value, (dict, list)):
            return json.dumps(value, ensure_ascii=False)
        raise self.error("bad_type", f"got {type(value).__name__}", field, "text")

    def tools(self) -> str:
        col = self.spec.columns.tools
        value = self.get(col)
        if value is None or value == "":
            return ""
        if isinstance(value, (list, dict)):
            return json.dumps(value, ensure_ascii=False)
        if isinstance(value, str):
            try:
                orjson.loads(value)
            except orjson.JSONDecodeError as e:
                raise self.error(
                    "bad_type", f"not valid JSON ({e.msg})", str(col), "JSON text of tool schemas"
                ) from e
            return value
        raise self.error(
            "bad_type", f"got {type(value).__name__}", str(col), "JSON text or a list of tool schemas"
        )

    def kto_tag(self) -> bool:
        col = self.spec.columns.kto_tag
        value = self.get(col, required=True)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise self.error("bad_type", f"got {value!r}", str(col), "true or false")

    def finish(self, messages: list[Message], system: str) -> Row:
        if system:
            messages = [Message(role="system", content=system), *messages]
        return Row(messages=messages, system=system, tools=self.tools())

    # -- alpaca ---------------------------------------------------------------------------------------

    def alpaca(self) -> Row:
        c = self.spec.columns
        prompt = self.text(self.get(c.prompt, required=True), str(c.prompt))
        query = self.text(self.get(c.query), str(c.query))
        content = "\n".join(p for p in (prompt, query) if p)
        if self.spec.kind == "text":
            if not content.strip():
                raise self.error("empty_text", "text is empty", str(c.prompt), "non-empty text")
            return Row(text=content)
        if not content.strip():
            raise self.error("empty_prompt", "prompt is empty", str(c.prompt), "a non-empty instruction")
        messages = self.history()
        messages.append(Message(role="user", content=content))
        row_extra: Row = {}
        if self.spec.kind == "ranking":
            row_extra["chosen"] = self.alpaca_answer(c.chosen)
            row_extra["rejected"] = self.alpaca_answer(c.rejected)
        else:
            response = self.text(self.get(c.response, required=self.require_response), str(c.response))
            if response.strip():
                messages.append(Message(role="assistant", content=response))
            elif self.require_response:
                raise self.error(
                    "empty_response", "response is empty", str(c.response), "a non-empty response"
                )
            if self.spec.kind == "kto":
                row_extra["kto_tag"] = self.kto_tag()
        row = self.finish(messages, self.text(self.get(c.system), str(c.system)))
        row.update(row_extra)
        return row

    def alpaca_answer(self, column: str | None) -> Message:
        value = self.get(column, required=True)
        if isinstance(value, (dict, list)):
            raise self.error("bad_type", f"got {type(value).__name__}", str(column), "the answer text")
        content = self.text(value, str(column))
        if not content.strip():
            raise self.error("empty_response", "answer is empty", str(column), "a non-empty answer")
        return Message(role="assistant", content=content)

    def history(self) -> list[Message]:
        col = self.spec.columns.history
        value = self.get(col)
        if value is None:
            return []
        expected = "a list of [query, response] pairs"
        if not isinstance(value, list):
            raise self.error("bad_type", f"got {type(value).__name__}", str(col), expected)
        out: list[Message] = []
        for i, pair in enumerate(value):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise self.error("bad_type", f"item {i} is {pair!r}", f"{col}[{i}]", expected)
            out.append(Message(role="user", content=self.text(pair[0], f"{col}[{i}][0]")))
            out.append(Message(role="assistant", content=self.text(pair[1], f"{col}[{i}][1]")))
        return out

    # -- sharegpt / openai ----------------------------------------------------------------------------

    def conversation(self) -> Row:
        c = self.spec.columns
        raw = self.get(c.messages, required=True)
        if not isinstance(raw, list):
            raise self.error("bad_type", f"got {type(raw).__name__}", str(c.messages), "a list of messages")
        if not raw:
            raise self.error("empty_prompt", "conversation is empty", str(c.messages), "at least one message")
        turns = [self.message(m, f"{c.messages}[{i}]") for i, m in enumerate(raw)]
        system = self.text(self.get(c.system), str(c.system))
        offset = 0
        if turns[0]["role"] == "system":
            system, offset = turns.pop(0)["content"], 1
        self.check_order(turns, str(c.messages), offset)
        row = self.finish(turns, system)
        if self.spec.kind == "ranking":
            row["chosen"] = self.answer(c.chosen)
            row["rejected"] = self.answer(c.rejected)
        elif self.spec.kind == "kto":
            row["kto_tag"] = self.kto_tag()
        return row

    def answer(self, column: str | None) -> Message:
        value = self.get(column, required=True)
        msg = self.message(value, str(column))
        if msg["role"] != "assistant":
            raise self.error(
                "bad_role_order", f"role is {msg['role']!r}", str(column), "an assistant message"
            )
        if not msg["content"].strip() and not msg.get("tool_calls"):
            raise self.error("empty_response", "answer is empty", str(column), "a non-empty answer")
        return msg

    def message(self, m: Any, field: str) -> Message:
        t = self.spec.tags
        if not isinstance(m, dict):
            raise self.error(
                "bad_type", f"got {type(m).__name__}", field, f"a message object with {t.role_tag!r}"
            )
        if t.role_tag not in m:
            raise self.error("missing_column", "message has no role", f"{field}.{t.role_tag}", "a role")
        roles = self.roles
        tag = m[t.role_tag]
        role = roles.get(tag) if isinstance(tag, str) else None
        if role is None:
            raise self.error(
                "unknown_role", f"role {tag!r}", f"{field}.{t.role_tag}", " or ".join(map(repr, roles))
            )
        has_calls = bool(m.get("tool_calls"))
        if t.content_tag not in m and not has_calls:
            raise self.error(
                "missing_column", "message has no content", f"{field}.{t.content_tag}", "the content"
            )
        content, reasoning, calls = self.content(m.get(t.content_tag), f"{field}.{t.content_tag}")
        if role == "function":  # a sharegpt function_call turn: its content is the call(s) as JSON
            role, calls, content = (
                "assistant",
                calls + self.parse_calls(content, f"{field}.{t.content_tag}"),
                "",
            )
        if has_calls:
            calls += [
                self.tool_call(c, f"{field}.tool_calls[{i}]")
                for i, c in enumerate(self.listed(m, "tool_calls", field))
            ]
        for key in ("reasoning_content", "reasoning"):
            if m.get(key):
                reasoning = self.text(m[key], f"{field}.{key}")
        msg = Message(role=role, content=content)  # type: ignore[typeddict-item]
        if calls:
            msg["tool_calls"] = calls
        if reasoning:
            msg["reasoning"] = reasoning
        if "train" in m and m["train"] is not None:
            if not isinstance(m["train"], bool):
                raise self.error("bad_type", f"got {m['train']!r}", f"{field}.train", "true or false")
            msg["train"] = m["train"]
        if "weight" in m and m["weight"] is not None:
            if isinstance(m["weight"], bool) or not isinstance(m["weight"], (int, float)):
                raise self.error("bad_type", f"got {m['weight']!r}", f"{field}.weight", "a number")
            msg["weight"] = float(m["weight"])
        return msg

    def listed(self, m: dict[str, Any], key: str, field: str) -> list[Any]:
        if not isinstance(m[key], list):
            raise self.error("bad_type", f"got {type(m[key]).__name__}", f"{field}.{key}", "a list")
        return m[key]

    def content(self, value: Any, field: str) -> tuple[str, str, list[ToolCall]]:
        """Content as text, or OpenAI-style parts -> (text, reasoning, tool calls)."""
        if not (
            isinstance(value, list) and value and all(isinstance(p, dict) and "type" in p for p in value)
        ):
            return self.text(value, field), "", []
        texts, reasoning, calls = [], [], []
        for i, part in enumerate(value):
            where = f"{field}[{i}]"
            body = self.text(part.get("text", part.get("value")), where)
            if part["type"] == "text":
                texts.append(body)
            elif part["type"] in ("reasoning", "thinking"):
                reasoning.append(body)
            elif part["type"] == "tool_call":
                calls += self.parse_calls(body, where)
            else:
                raise self.error("bad_type", f"part type {part['type']!r} (multimodal parts are not supported yet)",
                                 f"{where}.type", "text, reasoning or tool_call")  # fmt: skip
        return "".join(texts), "\n".join(reasoning), calls

    def parse_calls(self, text: str, field: str) -> list[ToolCall]:
        expected = 'JSON {"name": ..., "arguments": {...}} or a list of them'
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise self.error(
                "bad_tool_call", f"tool call is not valid JSON ({e.msg})", field, expected
            ) from e
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error("bad_tool_call", "no tool call", field, expected)
        return [
            self.tool_call(item, f"{field}[{i}]" if isinstance(value, list) else field)
            for i, item in enumerate(items)
        ]

    def tool_call(self, item: Any, field: str) -> ToolCall:
        """{"name", "arguments"} or OpenAI's {"type": "function", "function": {"name", "arguments"}}."""
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = item["function"]
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise self.error(
                "bad_tool_call", f"got {item!r}", field, 'an object with a "name" and "arguments"'
            )
        args = item.get("arguments", item.get("parameters"))
        if args is None:
            args = {}
        elif isinstance(args, str):
            try:
                parsed = orjson.loads(args)
            except orjson.JSONDecodeError:
                parsed = None
            args = (
                parsed if isinstance(parsed, dict) else args
            )  # keep the raw text when it is not a JSON object
        elif not isinstance(args, dict):
            raise self.error(
                "bad_tool_call", f"arguments {args!r}", f"{field}.arguments", "an object or JSON text"
            )
        return ToolCall(name=item["name"], arguments=args)

    def check_order(self, turns: list[Message], field: str, offset: int) -> None:
        """user/tool turns at even slots, assistant at odd (LLaMA-Factory's rule); consecutive tool turns share
        a slot (parallel tool results)."""
        slots: list[str] = []
        for i, turn in enumerate(turns, start=offset):
            role = turn["role"]
            if role == "system":
                raise self.error("bad_role_order", "a system message after the first", f"{field}[{i}]",
                                 "system only as the first message")  # fmt: skip
            if role == "tool" and slots and slots[-1] == "tool":
                continue
            allowed = ("user", "tool") if len(slots) % 2 == 0 else ("assistant",)
            if role not in allowed:
                raise self.error("bad_role_order", f"{role} turn at position {len(slots)}", f"{field}[{i}]",
                                 " or ".join(allowed) + " here; turns alternate user, assistant, user, ...")  # fmt: skip
            slots.append(role)
        ends_with_answer = len(slots) % 2 == 0
        if self.spec.kind == "ranking":
            if ends_with_answer:
                raise self.error("bad_role_order", "prompt ends with an assistant turn", field,
                                 "a prompt ending with a user turn (answers go in chosen/rejected)")  # fmt: skip
            return
        if not ends_with_answer:
            if self.require_response:
                raise self.error("bad_role_order", "conversation ends without an assistant turn", field,
                                 "a final assistant turn")  # fmt: skip
            return
        last = turns[-1]
        if not last["content"].strip() and not last.get("tool_calls"):
            raise self.error("empty_response", "the final assistant turn is empty", f"{field}[{len(turns) - 1 + offset}]",
                             "a non-empty response")  # fmt: skip
