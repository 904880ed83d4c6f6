"""Test helper: render an Ollama TEMPLATE in Python, as Ollama does, for the Go template subset we emit.

* ``ollama_messages``: Ollama's request handling before templating (server/routes.go ChatHandler: the
  Modelfile SYSTEM goes first unless the request starts with a system message; template/template.go
  collate: consecutive messages of one role, tool results excepted, are merged with "\\n\\n").
* ``render``: Go text/template for what tunesmith.export.ollama writes: text, ``{{``/``{{-`` actions,
  comments, if / else if / else / range $i, $_ := ..., variable declaration and assignment, fields
  (``.X``, ``$.X``, ``$v.X``), string and int literals, parentheses, and the builtins eq ne lt gt and or
  not len slice. Anything else raises, so the subset cannot grow unnoticed (the Go renderer cross-checks).
* ``parse_modelfile``: Ollama's Modelfile parser (parser/parser.go), commands and their values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# --- Ollama's request handling ---------------------------------------------------------------------


def ollama_messages(messages: list[dict[str, Any]], system: str = "") -> list[dict[str, Any]]:
    """The ``.Messages`` Ollama's template sees, from request messages (OpenAI keys) and a Modelfile SYSTEM."""
    msgs = [
        {"Role": m["role"], "Content": m.get("content", ""), "Thinking": m.get("thinking", "")}
        for m in messages
    ]
    if msgs and msgs[0]["Role"] != "system" and system:
        msgs.insert(0, {"Role": "system", "Content": system, "Thinking": ""})
    out: list[dict[str, Any]] = []
    for m in msgs:
        if out and out[-1]["Role"] == m["Role"] and m["Role"] != "tool":
            out[-1]["Content"] += "\n\n" + m["Content"]
        else:
            out.append(dict(m))
    return out


def render_ollama(
    template: str, messages: list[dict[str, Any]], system: str = "", think: bool | None = None
) -> str:
    """The prompt Ollama renders for a chat request (the ``.Messages`` path of template.Execute)."""
    data = {
        "System": "\n\n".join(
            m["Content"] for m in ollama_messages(messages, system) if m["Role"] == "system"
        ),
        "Messages": ollama_messages(messages, system),
        "Tools": None,
        "Response": "",
        "Think": bool(think),
        "IsThinkSet": think is not None,
    }
    return render(template, data)


# --- the Go template subset --------------------------------------------------------------------------

_SPACE = " \t\r\n"


@dataclass
class _Node:
    kind: str  # text | print | assign | declare | if | range | comment
    value: Any = None
    branches: list[tuple[Any, list[_Node]]] | None = None  # if: (test, body) ...; else: (None, body)
    names: tuple[str, ...] = ()


def render(template: str, data: dict[str, Any]) -> str:
    """Execute ``template`` with ``data`` as its dot (Go text/template semantics for our subset)."""
    nodes, rest = _parse(_lex(template), 0, top=True)
    assert rest is None
    out: list[str] = []
    _exec(nodes, data, [{"$": data}], out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    """Text and action items; trim markers applied, comments dropped (Go's lexer rules for delimiters)."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    while True:
        start = template.find("{{", pos)
        text = template[pos:] if start < 0 else template[pos:start]
        text = text.lstrip(_SPACE) if trim_next else text
        if start < 0:
            return items + ([("text", text)] if text else [])
        trim = template[start + 2 : start + 3] == "-" and template[start + 3 : start + 4] in tuple(_SPACE)
        text = text.rstrip(_SPACE) if trim else text
        if text:
            items.append(("text", text))
        i = j = start + (4 if trim else 2)
        comment = template.startswith("/*", i)
        if comment:
            j = template.index("*/", i) + 2
        while not template.startswith("}}", j) and not (
            template[j] in _SPACE and template.startswith("-}}", j + 1)
        ):
            if comment:
                raise SyntaxError("a comment must end at the closing delimiter")
            if template[j] == '"':
                j += 1
                while template[j] != '"':
                    j += 2 if template[j] == "\\" else 1
            j += 1
        trim_next = not template.startswith("}}", j)
        if not comment:
            items.append(("act", template[i:j].strip()))
        pos = j + (4 if trim_next else 2)


def _parse(items: list[tuple[str, str]], i: int, top: bool = False) -> tuple[list[_Node], Any]:
    """Nodes up to the closing ``end`` / ``else``; returns (nodes, (closing code, next index))."""
    nodes: list[_Node] = []
    while i < len(items):
        kind, code = items[i]
        i += 1
        if kind == "text":
            nodes.append(_Node("text", code))
        elif code == "end" or code == "else" or code.startswith("else if "):
            if top:
                raise SyntaxError(f"unexpected {code!r}")
            return nodes, (code, i)
        elif code.startswith("if "):
            branches, test = [], _expr(code[3:])
            while True:
                body, (closing, i) = _parse(items, i)
                branches.append((test, body))
                if closing == "end":
                    break
                test = _expr(closing[8:]) if closing.startswith("else if ") else None
            nodes.append(_Node("if", branches=branches))
        elif code.startswith("range "):
            m = re.fullmatch(r"range (\$\w+), (\$\w*) := (.+)", code)
            if not m:
                raise SyntaxError(f"unsupported range {code!r}")
            body, (closing, i) = _parse(items, i)
            if closing != "end":
                raise SyntaxError("range ... else is not in the subset")
            nodes.append(_Node("range", _expr(m.group(3)), [(None, body)], (m.group(1), m.group(2))))
        elif m := re.fullmatch(r"(\$\w+) (:?=) (.+)", code):
            kind = "declare" if m.group(2) == ":=" else "assign"
            nodes.append(_Node(kind, _expr(m.group(3)), names=(m.group(1),)))
        else:
            nodes.append(_Node("print", _expr(code)))
    if not top:
        raise SyntaxError("missing {{ end }}")
    return nodes, None


_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(-?\d+)|(\()|(\))|(\$\w*(?:\.\w+)*)|(\.\w+(?:\.\w+)*)|(\w+))')


def _expr(code: str) -> Any:
    """A command: ('call', name, args) or one operand; operands: ('str'|'int'|'var'|'field'|'bool', value)."""
    tokens, pos = [], 0
    code = code.strip()
    while pos < len(code):
        m = _TOKEN.match(code, pos)
        if not m or m.end() == pos:
            raise SyntaxError(f"not in the subset: {code[pos:]!r}")
        tokens.append(m)
        pos = m.end()
    node, i = _command(tokens, 0)
    if i != len(tokens):
        raise SyntaxError(f"trailing tokens in {code!r}")
    return node


def _command(tokens: list[re.Match[str]], i: int) -> tuple[Any, int]:
    """One command from tokens[i:], up to a closing parenthesis or the end; returns (node, where it stopped)."""
    args: list[Any] = []
    while i < len(tokens) and not tokens[i].group(4):
        m = tokens[i]
        if m.group(3):
            sub, i = _command(tokens, i + 1)
            if i >= len(tokens):
                raise SyntaxError("unbalanced parentheses")
            args.append(sub)
        elif m.group(1):
            args.append(("str", _unquote(m.group(1))))
        elif m.group(2):
            args.append(("int", int(m.group(2))))
        elif m.group(5):
            args.append(("var", m.group(5)))
        elif m.group(6):
            args.append(("field", m.group(6)))
        elif m.group(7) in ("true", "false"):
            args.append(("bool", m.group(7) == "true"))
        else:
            if args or m.group(7) not in _FUNCS:
                raise SyntaxError(f"unknown function {m.group(7)!r}")
            args.append(("func", m.group(7)))
        i += 1
    if not args:
        raise SyntaxError("empty command")
    if args[0][0] == "func":
        return ("call", args[0][1], args[1:]), i
    if len(args) != 1:
        raise SyntaxError("a command of several operands needs a function first")
    return args[0], i


_ESC = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _unquote(lit: str) -> str:
    out, body, i = [], lit[1:-1], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
        elif body[i + 1] in _ESC:
            out.append(_ESC[body[i + 1]])
            i += 2
        elif body[i + 1] in "uU":
            n = 4 if body[i + 1] == "u" else 8
            out.append(chr(int(body[i + 2 : i + 2 + n], 16)))
            i += 2 + n
        else:
            raise SyntaxError(f"escape not in the subset: {body[i : i + 2]!r}")
    return "".join(out)


def _truth(v: Any) -> bool:
    return v not in (None, False, 0, "") and not (isinstance(v, (list, dict)) and not v)


def _cmp(op: Any) -> Any:
    def f(a: Any, b: Any) -> bool:
        if type(a) is not type(b):
            raise TypeError(f"incompatible types for comparison: {a!r}, {b!r}")
        return op(a, b)

    return f


_FUNCS: dict[str, Any] = {
    "eq": _cmp(lambda a, b: a == b),
    "ne": _cmp(lambda a, b: a != b),
    "lt": _cmp(lambda a, b: a < b),
    "gt": _cmp(lambda a, b: a > b),
    "not": lambda a: not _truth(a),
    "len": len,
    "slice": lambda x, i: x[i:] if 0 <= i <= len(x) else _fail(f"slice index {i} out of range"),
}


def _fail(message: str) -> Any:
    raise IndexError(message)


def _eval(node: Any, dot: Any, scopes: list[dict[str, Any]]) -> Any:
    kind = node[0]
    if kind in ("str", "int", "bool"):
        return node[1]
    if kind == "field":
        return _fields(dot, node[1].split(".")[1:])
    if kind == "var":
        name, *path = node[1].split(".")
        for scope in reversed(scopes):
            if name in scope:
                return _fields(scope[name], path)
        raise NameError(f"undefined variable {name}")
    name, args = node[1], node[2]
    if name in ("and", "or"):  # Go 1.18+: stops at the first falsy (and) / truthy (or) argument
        value = None
        for a in args:
            value = _eval(a, dot, scopes)
            if _truth(value) != (name == "and"):
                break
        return value
    return _FUNCS[name](*(_eval(a, dot, scopes) for a in args))


_FUNCS["and"] = _FUNCS["or"] = None  # handled in _eval (short-circuit); listed so the parser knows them


def _fields(value: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"can't evaluate field {key} in {value!r}")
        value = value[key]
    return value


def _exec(nodes: list[_Node], dot: Any, scopes: list[dict[str, Any]], out: list[str]) -> None:
    scopes.append({})
    for node in nodes:
        if node.kind == "text":
            out.append(node.value)
        elif node.kind == "print":
            value = _eval(node.value, dot, scopes)
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise TypeError(f"printing {value!r} is not in the subset")
            out.append(str(value))
        elif node.kind == "declare":
            scopes[-1][node.names[0]] = _eval(node.value, dot, scopes)
        elif node.kind == "assign":
            for scope in reversed(scopes):
                if node.names[0] in scope:
                    scope[node.names[0]] = _eval(node.value, dot, scopes)
                    break
            else:
                raise NameError(f"undefined variable {node.names[0]}")
        elif node.kind == "if":
            for test, body in node.branches or []:
                if test is None or _truth(_eval(test, dot, scopes)):
                    _exec(body, dot, scopes, out)
                    break
        elif node.kind == "range":
            for i, item in enumerate(_eval(node.value, dot, scopes) or []):
                names = dict(zip(node.names, (i, item)))
                scopes.append(names)
                _exec((node.branches or [])[0][1], item, scopes, out)
                scopes.pop()
    scopes.pop()


# --- Ollama's Modelfile parser ----------------------------------------------------------------------


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as parser.ParseFile reads them (its state machine, ported rune by rune)."""
    commands: list[tuple[str, str]] = []
    state, buf, name = "nil", "", ""
    for r in text:
        nxt, keep = _next_state(r, state)
        if nxt != state:
            if state == "name":
                name = buf.lower()
                nxt = "parameter" if name == "parameter" else nxt
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = _unquote_modelfile(buf.strip())
                if not ok or r in " \t":
                    buf += r
                    continue
                commands.append((name, value))
            buf, state = "", nxt
        if keep is not None and keep.isprintable():
            buf += keep
    if state == "value":
        value, ok = _unquote_modelfile(buf.strip())
        if not ok:
            raise SyntaxError("unexpected EOF in a quoted value")
        commands.append((name, value))
    elif state not in ("nil", "comment"):
        raise SyntaxError("unexpected EOF")
    return commands


def _next_state(r: str, state: str) -> tuple[str, str | None]:
    space, newline = r in " \t", r in "\r\n"
    if state == "nil":
        return ("comment", None) if r == "#" else ("nil", None) if space or newline else ("name", r)
    if state == "name":
        if r.isascii() and r.isalpha():
            return "name", r
        if space:
            return "value", None
        raise SyntaxError("invalid command")
    if state == "value":
        return ("nil", r) if space or newline else ("value", r)
    if state == "parameter":
        if r.isascii() and (r.isalnum() or r == "_"):
            return "parameter", r
        if space:
            return "value", None
        raise SyntaxError("bad parameter name")
    return ("nil", None) if newline else ("comment", None)


def _unquote_modelfile(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True
