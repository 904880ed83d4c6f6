"""formats.to_row: every supported shape -> canonical Row, and each bad-row reason with its location."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tunesmith.data.formats import REASONS, RowError, to_row
from tunesmith.data.registry import OPENAI_TAGS, Columns, DatasetSpec, Tags
from tunesmith.data.types import Record
from tunesmith.errors import DataError, Location

WHERE = Location("data/train.jsonl", line=7, index=6)
ALPACA = DatasetSpec("a", formatting="alpaca", columns=Columns(prompt="instruction", query="input", response="output",
                                                             history="history", system="system", tools="tools"))  # fmt: skip
SHAREGPT = DatasetSpec("s", formatting="sharegpt", columns=Columns(messages="conversations", tools="tools"))
OPENAI = DatasetSpec(
    "o", formatting="openai", columns=Columns(messages="messages", tools="tools"), tags=OPENAI_TAGS
)


def row(data: dict[str, Any], spec: DatasetSpec, **kw: Any):
    return to_row(Record(data, WHERE), spec, **kw)


def bad(data: dict[str, Any], spec: DatasetSpec, **kw: Any) -> RowError:
    with pytest.raises(RowError) as info:
        row(data, spec, **kw)
    err = info.value
    assert isinstance(err, DataError) and err.reason in REASONS
    assert "data/train.jsonl:7" in str(err)  # file and line
    return err


# -- alpaca -------------------------------------------------------------------------------------------


def test_alpaca_joins_prompt_and_query_and_keeps_history_system_tools():
    r = row({"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be brief.",
             "history": [["hi", "hello"]], "tools": [{"name": "add"}], "id": 42}, ALPACA)  # fmt: skip
    assert r["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Sum\n1 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert r["system"] == "Be brief."
    assert json.loads(r["tools"]) == [{"name": "add"}]
    assert r["extra"] == {"id": 42}
    assert r["source"] == str(WHERE)


def test_alpaca_canonicalises_types():
    r = row({"instruction": 12, "input": None, "output": True, "system": None, "tools": None}, ALPACA)
    assert r["messages"] == [{"role": "user", "content": "12"}, {"role": "assistant", "content": "True"}]
    assert r["system"] == "" and r["tools"] == ""
    r = row({"instruction": {"q": 1}, "output": [1, 2]}, ALPACA)
    assert r["messages"][0]["content"] == '{"q": 1}' and r["messages"][1]["content"] == "[1, 2]"


def test_alpaca_ranking_kto_and_text():
    ranking = DatasetSpec(
        "r", ranking=True, columns=Columns(prompt="instruction", chosen="chosen", rejected="rejected")
    )
    r = row({"instruction": "q", "chosen": "good", "rejected": "bad"}, ranking)
    assert r["messages"] == [{"role": "user", "content": "q"}]
    assert r["chosen"] == {"role": "assistant", "content": "good"}
    assert r["rejected"] == {"role": "assistant", "content": "bad"}
    kto = DatasetSpec("k", columns=Columns(prompt="prompt", response="completion", kto_tag="label"))
    for value, tag in ((True, True), ("false", False), (1, True)):
        r = row({"prompt": "q", "completion": "a", "label": value}, kto)
        assert r["kto_tag"] is tag and r["messages"][-1] == {"role": "assistant", "content": "a"}
    text = DatasetSpec("t", columns=Columns(prompt="text"))
    assert text.kind == "text"
    r = row({"text": "Once upon a time", "meta": 1}, text)
    assert r["text"] == "Once upon a time" and "messages" not in r and r["extra"] == {"meta": 1}


def test_prompt_only_rows_when_response_not_required():
    r = row({"instruction": "q", "output": ""}, ALPACA, require_response=False)
    assert r["messages"] == [{"role": "user", "content": "q"}]
    r = row({"conversations": [{"from": "human", "value": "q"}]}, SHAREGPT, require_response=False)
    assert r["messages"] == [{"role": "user", "content": "q"}]


# -- sharegpt -----------------------------------------------------------------------------------------


def test_sharegpt_function_call_and_observation():
    conv = [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "get", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": '{"t": 3}'},
        {"from": "gpt", "value": "3 degrees"},
    ]
    r = row({"conversations": conv, "tools": '[{"name": "get"}]'}, SHAREGPT)
    assert r["system"] == "sys"
    assert r["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "content": '{"t": 3}'},
        {"role": "assistant", "content": "3 degrees"},
    ]
    assert r["tools"] == '[{"name": "get"}]'


def test_sharegpt_parallel_calls_and_string_arguments():
    call = json.dumps([{"name": "a", "arguments": '{"x": 1}'}, {"name": "b", "arguments": "not json"}])
    conv = [{"from": "human", "value": "q"}, {"from": "function_call", "value": call}]
    r = row({"conversations": conv}, SHAREGPT)
    assert r["messages"][-1]["tool_calls"] == [
        {"name": "a", "arguments": {"x": 1}},
        {"name": "b", "arguments": "not json"},
    ]


def test_sharegpt_with_role_content_tags_ranking_and_kto():
    tags = Tags("role", "content", "user", "assistant")
    spec = DatasetSpec("d", formatting="sharegpt", ranking=True, tags=tags,
                       columns=Columns(messages="conversations", chosen="chosen", rejected="rejected"))  # fmt: skip
    r = row({"conversations": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "y"},
             "rejected": {"role": "assistant", "content": "n"}}, spec)  # fmt: skip
    assert r["messages"] == [{"role": "user", "content": "q"}]
    assert r["chosen"]["content"] == "y" and r["rejected"]["content"] == "n"
    kto = DatasetSpec(
        "k", formatting="sharegpt", tags=tags, columns=Columns(messages="messages", kto_tag="label")
    )
    r = row(
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "label": False,
        },
        kto,
    )
    assert r["kto_tag"] is False and len(r["messages"]) == 2


# -- openai -------------------------------------------------------------------------------------------


def test_openai_content_parts_reasoning_and_tool_call_parts():
    msgs = [
        {"role": "system", "content": [{"type": "text", "value": "sys"}]},
        {"role": "user", "content": [{"type": "text", "text": "find it"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "think"},
                                          {"type": "tool_call", "value": '{"name": "f", "arguments": {"a": 1}}'}]},
        {"role": "tool", "content": [{"type": "text", "value": "r1"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "ok"}, {"type": "text", "value": "done"}]},
    ]  # fmt: skip
    r = row({"messages": msgs, "tools": "[]"}, OPENAI)
    assert r["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "find it"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "f", "arguments": {"a": 1}}],
            "reasoning": "think",
        },
        {"role": "tool", "content": "r1"},
        {"role": "assistant", "content": "done", "reasoning": "ok"},
    ]


def test_openai_tool_calls_train_weight_and_parallel_tool_results():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "train": False, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"type": "function", "function": {"name": "g", "arguments": {"b": 2}}}]},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "both", "weight": 2},
    ]  # fmt: skip
    r = row({"messages": msgs}, OPENAI)
    a = r["messages"][1]
    assert a["train"] is False and a["content"] == ""
    assert a["tool_calls"] == [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": 2}}]
    assert [m["role"] for m in r["messages"]] == ["user", "assistant", "tool", "tool", "assistant"]
    assert r["messages"][-1]["weight"] == 2.0 and isinstance(r["messages"][-1]["weight"], float)


# -- bad rows -----------------------------------------------------------------------------------------


def test_missing_column_names_field():
    err = bad({"input": "x", "output": "y"}, ALPACA)
    assert err.reason == "missing_column" and err.field == "instruction" and "field 'instruction'" in str(err)


def test_wrong_role_order():
    conv = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]
    err = bad({"conversations": conv}, SHAREGPT)
    assert err.reason == "bad_role_order" and err.field == "conversations[1]"
    assert "expected assistant" in str(err)
    err = bad({"conversations": conv[:1]}, SHAREGPT)
    assert err.reason == "bad_role_order" and "final assistant turn" in str(err)
    msgs = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]
    err = bad({"messages": msgs}, OPENAI)
    assert err.reason == "bad_role_order" and err.field == "messages[1]"  # index counts the system turn


def test_empty_response():
    err = bad({"instruction": "q", "output": "  "}, ALPACA)
    assert err.reason == "empty_response" and err.field == "output"
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]
    err = bad({"conversations": conv}, SHAREGPT)
    assert err.reason == "empty_response" and err.field == "conversations[1]"


def test_wrong_types():
    err = bad({"instruction": "q", "output": "a", "history": "not a list"}, ALPACA)
    assert err.reason == "bad_type" and err.field == "history" and "pairs" in str(err)
    err = bad({"conversations": "hello"}, SHAREGPT)
    assert err.reason == "bad_type" and "expected a list of messages" in str(err)
    err = bad({"instruction": "q", "output": "a", "tools": "{not json"}, ALPACA)
    assert err.reason == "bad_type" and err.field == "tools"
    msgs = [
        {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
        {"role": "assistant", "content": "a"},
    ]
    err = bad({"messages": msgs}, OPENAI)
    assert err.reason == "bad_type" and "multimodal" in str(err)
    err = bad(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "train": "no"},
            ]
        },
        OPENAI,
    )
    assert err.reason == "bad_type" and err.field == "messages[1].train"
    kto = DatasetSpec("k", columns=Columns(prompt="p", response="r", kto_tag="label"))
    assert bad({"p": "q", "r": "a", "label": "maybe"}, kto).reason == "bad_type"


def test_unknown_role_bad_tool_call_and_empty_prompt():
    err = bad({"conversations": [{"from": "bot", "value": "x"}]}, SHAREGPT)
    assert err.reason == "unknown_role" and err.field == "conversations[0].from" and "'human'" in str(err)
    conv = [{"from": "human", "value": "q"}, {"from": "function_call", "value": "call f please"}]
    assert bad({"conversations": conv}, SHAREGPT).reason == "bad_tool_call"
    assert bad({"instruction": "", "input": "", "output": "a"}, ALPACA).reason == "empty_prompt"
    assert bad({"conversations": []}, SHAREGPT).reason == "empty_prompt"


def test_ranking_answers_must_be_assistant_messages():
    spec = DatasetSpec("d", formatting="sharegpt", ranking=True,
                       columns=Columns(messages="conversations", chosen="chosen", rejected="rejected"))  # fmt: skip
    base = {"conversations": [{"from": "human", "value": "q"}], "rejected": {"from": "gpt", "value": "n"}}
    assert bad({**base, "chosen": {"from": "human", "value": "y"}}, spec).reason == "bad_role_order"
    assert bad({**base, "chosen": "y"}, spec).reason == "bad_type"
    assert bad({**base, "chosen": {"from": "gpt", "value": ""}}, spec).reason == "empty_response"
    two = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert (
        bad({**base, "conversations": two, "chosen": {"from": "gpt", "value": "y"}}, spec).reason
        == "bad_role_order"
    )
