"""Tool-call formats: how tool schemas and an assistant's tool calls become text.

A chat template names its format with ``tool_format: qwen``. The format says how the tool schemas are
written into the system prompt and how each call is written inside the assistant turn; where tool
*results* go (their turn markup) is chat markup and lives in the template's ``tool`` field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tunesmith.data.types import ToolCall
from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool text. ``{tools}``, ``{name}``, ``{arguments}`` are the placeholders."""

    name: str
    system_block: str  # the tool schemas as system-prompt text; {tools} = the schema lines
    tool_line: str  # one schema; {tool} = its JSON
    system_join: str  # between the system prompt and the block when both are present
    call: str  # one call; {name}, {arguments} (JSON of the arguments)
    call_join: str  # between consecutive calls
    content_call_sep: str  # between the assistant's text and its first call, when it has text


# Hermes / Qwen2.5 / Qwen3: the text of the official Qwen chat templates, byte for byte.
_QWEN_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)

TOOL_FORMATS: dict[str, ToolFormat] = {
    "qwen": ToolFormat(
        name="qwen",
        system_block=_QWEN_BLOCK,
        tool_line="\n{tool}",
        system_join="\n\n",
        call='<tool_call>\n{"name": "{name}", "arguments": {arguments}}\n</tool_call>',
        call_join="\n",
        content_call_sep="\n",
    ),
}


def get_tool_format(name: str) -> ToolFormat:
    """The tool format called ``name``; unknown -> TunesmithError listing the known ones."""
    if name not in TOOL_FORMATS:
        raise TunesmithError(f"unknown tool_format {name!r}; known: {', '.join(sorted(TOOL_FORMATS))}")
    return TOOL_FORMATS[name]


def parse_tools(tools: str) -> list[dict[str, Any]]:
    """Tool schemas from JSON text: a list (or one object); bare functions get the OpenAI wrapper.

    ``{"name": ..., "parameters": ...}`` becomes ``{"type": "function", "function": {...}}``, the shape
    the official templates are given by transformers' ``get_json_schema`` and by OpenAI clients.
    """
    if not tools.strip():
        return []
    try:
        value = json.loads(tools)
    except json.JSONDecodeError as exc:
        raise TunesmithError(
            f"tools: not valid JSON ({exc.msg} at char {exc.pos}); expected a JSON list of tool schemas "
            f'like [{{"name": "get_weather", "parameters": {{...}}}}]; got {tools[:80]!r}'
        ) from None
    items = value if isinstance(value, list) else [value]
    out = []
    for i, tool in enumerate(items):
        if not isinstance(tool, dict):
            raise TunesmithError(f"tools[{i}]: expected a JSON object (a tool schema), got {tool!r}")
        out.append(tool if tool.get("type") == "function" else {"type": "function", "function": tool})
    return out


def fill(fmt: str, **values: str) -> str:
    """``fmt`` with each ``{key}`` of ``values`` replaced, in one pass; other braces stay literal.

    Not str.format: template text and schema JSON are full of literal braces, and one pass means a
    value that itself contains ``{content}`` is never expanded again.
    """
    if len(values) == 1:  # the common case; str.replace is one pass too (inserted text is not rescanned)
        ((key, value),) = values.items()
        return fmt.replace("{" + key + "}", value)
    pattern = re.compile("|".join(re.escape("{" + key + "}") for key in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], fmt)


def tools_text(fmt: ToolFormat, tools: str) -> str:
    """The system-prompt block for the tool schemas in ``tools`` (JSON text); "" when there are none."""
    schemas = parse_tools(tools)
    if not schemas:
        return ""
    lines = "".join(fill(fmt.tool_line, tool=json.dumps(t, ensure_ascii=False)) for t in schemas)
    return fill(fmt.system_block, tools=lines)


def with_tools(fmt: ToolFormat, system: str, tools: str) -> str:
    """The system prompt followed by the tool block (either may be empty)."""
    block = tools_text(fmt, tools)
    return fmt.system_join.join(part for part in (system, block) if part)


def arguments_text(arguments: dict[str, Any] | str) -> str:
    """JSON of the arguments as the official templates write it (``tojson``: no ASCII escaping).

    A string is kept as it is: canonical rows hold a string only when the data's arguments were not
    valid JSON, and re-quoting it would hide that (Qwen3's template also writes strings verbatim).
    """
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def calls_text(fmt: ToolFormat, content: str, calls: list[ToolCall]) -> str:
    """The assistant's text followed by its tool calls."""
    rendered = fmt.call_join.join(
        fill(fmt.call, name=c["name"], arguments=arguments_text(c["arguments"])) for c in calls
    )
    return content + (fmt.content_call_sep if content else "") + rendered
