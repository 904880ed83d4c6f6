"""A named template written back as a jinja chat template, so a saved tokenizer renders as training did.

``to_jinja(template)`` builds the HF chat template (what ``tokenizer.apply_chat_template``, vLLM and
OpenAI-compatible servers render) from the template's fields; tests/data/test_template_jinja.py proves it
equal to ``render(template, ...).text`` for every built-in template. The generated jinja reads messages in
HF's shape: ``tools`` a list of schemas, ``tool_calls`` entries flat ``{name, arguments}`` or under
``function``, reasoning in ``reasoning_content`` (or ``reasoning``). Conversations our renderer refuses call
``raise_exception``. One leniency: a missing or null ``content`` renders as "" (OpenAI clients send
``content: null`` with tool calls; canonical rows always hold a string).

    >>> from tunesmith.data.templates import get_template
    >>> print(to_jinja(get_template("chatml")).splitlines()[-2])
        {{- "<|im_start|>assistant\\n" }}
"""

from __future__ import annotations

import json
import re
from typing import Any

from tunesmith.data.templates import AutoTemplate, Template
from tunesmith.data.tools import get_tool_format

__all__ = ["chat_template_for", "to_jinja"]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
# Placeholders of an unbound template become the variables apply_chat_template passes from the tokenizer.
_TOKENS = {"bos_token": "bos_token", "eos_token": "eos_token"}
_ROLES = '["system", "user", "assistant", "tool"]'


def chat_template_for(template: Template | AutoTemplate, tokenizer: Any) -> str | dict[str, str]:
    """The chat template to save with ``tokenizer``: its own one for ``auto``, else ``to_jinja(template)``."""
    if isinstance(template, AutoTemplate):
        # Unchanged (a dict of named templates stays a dict): auto trained on the tokenizer's default one.
        return tokenizer.chat_template
    return to_jinja(template)


def to_jinja(template: Template) -> str:
    """A HF-compatible jinja chat template that renders exactly like ``render(template, ...)``."""
    t = template
    name = t.name.replace("#}", "")
    lines = [
        f"{{#- tunesmith chat template {name!r}, generated from its fields by tunesmith.data.template_jinja #}}",
        '{%- set ns = namespace(first_user=-1, last_user=-1, fold_into=-1, fold_text="", text="") %}',
    ]
    if t.thinking is not None:
        lines.append("{%- set thinking_off = enable_thinking is defined and enable_thinking is false %}")
    lines += [
        *_checks(t),
        *_emit(_fill(t.bos, **_TOKENS)),
        *_system(t),
        "{%- for message in messages %}",
        *_indent(_message(t)),
        "{%- endfor %}",
        "{%- if add_generation_prompt %}",
        *_indent(_emit(_fill(t.generation_prompt, **_TOKENS))),
    ]
    if t.thinking is not None and t.thinking.empty_on_final:
        # Thinking off: the empty block a trained final answer would have in its header (Qwen3's prompt).
        lines += ["    {%- if thinking_off %}", *_indent(_emit(_lit(t.thinking.open + t.thinking.close)), 2)]
        lines += ["    {%- endif %}"]
    eoc = _emit(_fill(t.end_of_conversation, **_TOKENS))
    lines += ["{%- else %}", *_indent(eoc)] if eoc else []
    return "\n".join([*lines, "{%- endif %}"])


def _checks(t: Template) -> list[str]:
    """Find the user turns and refuse what ``templates._check_messages`` refuses, message by message."""
    where = '"message " ~ loop.index0 ~ " (" ~ message.role ~ "): " ~ '
    unknown = _lit("unknown role; expected system, user, assistant or tool")
    lines = [
        "{%- for message in messages %}",
        '    {%- if message.role == "user" %}',
        "        {%- if ns.first_user < 0 %}{%- set ns.first_user = loop.index0 %}{%- endif %}",
        "        {%- set ns.last_user = loop.index0 %}",
        "    {%- endif %}",
        f"    {{%- if message.role not in {_ROLES} %}}{{{{- raise_exception({where}{unknown}) }}}}{{%- endif %}}",
    ]
    refusals = []
    if t.system_placement != "own_turn":
        refusals.append(('message.role == "system" and not loop.first', "takes a system message only first"))
    if t.tool is None:
        refusals.append(('message.role == "tool"', "has no tool turn for tool results"))
    if t.tool_format:
        refusals.append(
            ('message.tool_calls and message.role != "assistant"', "takes tool calls only from assistants")
        )
    else:
        refusals.append(("message.tool_calls", "has no tool format for tool calls"))
    if t.thinking is None:
        refusals.append(
            ("message.reasoning_content or message.reasoning", "has no thinking tags for reasoning")
        )
    for test, what in refusals:
        error = f"{where}{_lit(f'template {t.name} {what}')}"
        lines.append(f"    {{%- if {test} %}}{{{{- raise_exception({error}) }}}}{{%- endif %}}")
    lines.append("{%- endfor %}")
    if not t.tool_format:
        lines += ["{%- if tools %}", f"    {{{{- raise_exception({_lit(_no_tools(t))}) }}}}", "{%- endif %}"]
    return lines


def _system(t: Template) -> list[str]:
    """The system prompt (first message, else the default) plus tools: its own turn or folded into a user's."""
    has_system = 'messages and messages[0].role == "system"'
    lines = [
        f"{{%- if {has_system} %}}",
        f"    {{%- set system = {_content(t, 'messages[0]', 'system')} %}}",
        "{%- else %}",
        f"    {{%- set system = {_lit(t.default_system)} %}}",
        "{%- endif %}",
    ]
    if t.tool_format:
        fmt = get_tool_format(t.tool_format)
        # parse_tools wraps bare function schemas the same way; tojson's defaults equal json.dumps(ensure_ascii=False).
        schema = '(tool if tool.type == "function" else {"type": "function", "function": tool}) | tojson'
        lines += [
            "{%- if tools %}",
            "    {%- for tool in tools %}",
            f"        {{%- set ns.text = ns.text ~ {_fill(fmt.tool_line, tool=schema)} %}}",
            "    {%- endfor %}",
            f"    {{%- set block = {_fill(fmt.system_block, tools='ns.text')} %}}",
            f"    {{%- set system = (system ~ {_lit(fmt.system_join)} ~ block) if system else block %}}",
            "{%- endif %}",
        ]
    always = " or true" if t.always_system else ""
    lines.append(f"{{%- if {has_system} or system{always} %}}")
    turn = _fill(t.system, content="system", **_TOKENS)
    if t.system_placement == "unsupported":
        lines.append(f"    {{{{- raise_exception({_lit(_no_system(t))}) }}}}")
    elif t.system_placement == "own_turn":
        lines.append(f"    {{{{- {turn} }}}}")
    else:
        no_user = f"template {t.name} puts the system prompt into a user turn, but the conversation has none"
        into = "ns.first_user" if t.system_placement == "first_user" else "ns.last_user"
        lines += [
            f"    {{%- if ns.first_user < 0 %}}{{{{- raise_exception({_lit(no_user)}) }}}}{{%- endif %}}",
            f"    {{%- set ns.fold_into = {into} %}}",
            f"    {{%- set ns.fold_text = {turn} %}}",
        ]
    return [*lines, "{%- endif %}"]


def _message(t: Template) -> list[str]:
    """One message of the main loop (the first message, when it is the system prompt, is already written)."""
    user = _content(t, "message", "user")
    if t.system_placement in ("first_user", "last_user"):
        user = f'(ns.fold_text if loop.index0 == ns.fold_into else "") ~ {user}'
    lines = [
        '{%- if message.role == "user" %}',
        f"    {{{{- {_fill(t.user, content=user, **_TOKENS)} }}}}",
        '{%- elif message.role == "system" and not loop.first %}',
        f"    {{{{- {_fill(t.system, content=_content(t, 'message', 'system'), **_TOKENS)} }}}}",
        '{%- elif message.role == "assistant" %}',
        *_indent(_assistant(t)),
    ]
    if t.tool is not None:
        # A run of consecutive tool results shares one group prefix and suffix (Qwen's one user turn).
        first = 'loop.first or messages[loop.index0 - 1].role != "tool"'
        last = 'loop.last or messages[loop.index0 + 1].role != "tool"'
        lines += [
            '{%- elif message.role == "tool" %}',
            *_indent(_emit(_fill(t.tool.group_prefix, **_TOKENS), when=first)),
            f"    {{{{- {_fill(t.tool.format, content=_content(t, 'message', 'tool'), **_TOKENS)} }}}}",
            *_indent(_emit(_fill(t.tool.group_suffix, **_TOKENS), when=last)),
        ]
    return [*lines, "{%- endif %}"]


def _assistant(t: Template) -> list[str]:
    """An assistant turn: reasoning split off, tool calls appended, the thinking block, then the turn."""
    lines = [f"{{%- set content = {_content(t, 'message', 'assistant')} %}}"]
    think = t.thinking
    if think is not None:
        # As _split_reasoning: reasoning given apart wins; else it is taken out of "<think>..</think>answer".
        close, open_ = _lit(think.close.strip()), _lit(think.open.strip())
        lines += [
            "{%- set reasoning = message.reasoning_content if message.reasoning_content is string "
            "else message.reasoning %}",
            f"{{%- if reasoning is not string and {close} in content %}}",
            f"    {{%- set reasoning = (content.split({close})[:-1] | join({close})).rstrip('\\n')"
            f".split({open_})[-1].lstrip('\\n') %}}",
            f"    {{%- set content = content.split({close})[-1].lstrip('\\n') %}}",
            "{%- elif reasoning is not string %}{%- set reasoning = '' %}",
            "{%- endif %}",
        ]
    if t.tool_format:
        fmt = get_tool_format(t.tool_format)
        call = _fill(fmt.call, name="call.name", arguments="arguments")
        lines += [
            "{%- if message.tool_calls %}",
            '    {%- set ns.text = "" %}',
            "    {%- for tool_call in message.tool_calls %}",
            "        {%- set call = tool_call.function if tool_call.function is defined else tool_call %}",
            # A string is written as it is (data whose arguments were not valid JSON), as tools.py does.
            "        {%- set arguments = call.arguments if call.arguments is string else call.arguments | tojson %}",
            f'        {{%- set ns.text = ns.text ~ ("" if loop.first else {_lit(fmt.call_join)}) ~ {call} %}}',
            "    {%- endfor %}",
            f'    {{%- set content = content ~ ({_lit(fmt.content_call_sep)} if content else "") ~ ns.text %}}',
            "{%- endif %}",
        ]
    lines.append(f"{{%- set header = {_fill(t.assistant.header, **_TOKENS)} %}}")
    if think is not None:
        keeps = (
            "true"
            if think.scope == "all"
            else "loop.index0 > (ns.last_user if ns.last_user >= 0 else loop.length - 1)"
        )
        final = " or (loop.last)" if think.empty_on_final else ""
        lines += [
            "{%- if thinking_off %}{%- set reasoning = '' %}{%- endif %}",
            f"{{%- if ({keeps}) and (reasoning{final}) %}}",
            f"    {{%- set block = {_lit(think.open)} ~ reasoning.strip('\\n') ~ {_lit(think.close)} %}}",
            "    {%- set content = content.lstrip('\\n') %}",
            # Thinking off: the (empty) block is prompt, as in the official generation prompt.
            "    {%- if thinking_off %}{%- set header = header ~ block %}",
            "    {%- else %}{%- set content = block ~ content %}{%- endif %}",
            "{%- endif %}",
        ]
    body = _fill(t.assistant.body, content="content", **_TOKENS)
    suffix = _fill(t.assistant.suffix, **_TOKENS)
    return [*lines, f"{{{{- header ~ {body} ~ {suffix} }}}}"]


def _content(t: Template, message: str, role: str) -> str:
    """The jinja expression of a message's content, stripped for the template's ``strip`` roles."""
    text = f'({message}.content or "")'
    return f"({text} | trim)" if role in t.strip else text


def _fill(fmt: str, **values: str) -> str:
    """A jinja expression for ``fmt`` with each ``{key}`` of ``values`` replaced by a jinja expression.

    The jinja twin of tools.fill: one pass, other braces stay literal text.
    """
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(fmt):
        if m.group(1) in values:
            parts += [_lit(fmt[pos : m.start()])] if m.start() > pos else []
            parts.append(f"({values[m.group(1)]})")
            pos = m.end()
    parts += [_lit(fmt[pos:])] if pos < len(fmt) else []
    return " ~ ".join(parts) or '""'


def _lit(text: str) -> str:
    # JSON string syntax is a valid jinja string literal (jinja decodes it with unicode-escape).
    return json.dumps(text, ensure_ascii=False)


def _emit(expr: str, when: str = "") -> list[str]:
    if expr == '""':
        return []
    out = f"{{{{- {expr} }}}}"
    return [f"{{%- if {when} %}}{out}{{%- endif %}}" if when else out]


def _indent(lines: list[str], levels: int = 1) -> list[str]:
    return ["    " * levels + line for line in lines]


def _no_system(t: Template) -> str:
    return (
        f"template {t.name} has no system prompt (its official template does not accept one), but the "
        "conversation has a system message or tools"
    )


def _no_tools(t: Template) -> str:
    return f"template {t.name} has no tool format, but tools were given"
