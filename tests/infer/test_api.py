"""The OpenAI-compatible server, live on localhost, driven by the official openai client (and raw HTTP
for what a client library would never send)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")
uvicorn = pytest.importorskip("uvicorn")

import tunesmith  # noqa: E402
import tunesmith.config  # noqa: E402
from tunesmith.data.templates import get_template  # noqa: E402
from tunesmith.data.tools import calls_text, get_tool_format  # noqa: E402
from tunesmith.infer.api.app import create_app  # noqa: E402
from tunesmith.infer.api.server import prepare  # noqa: E402
from tunesmith.infer.api.tool_calls import StreamHold, call_tags, parse_tool_calls  # noqa: E402
from tunesmith.infer.engine import Completion, StreamEvent, load_engine  # noqa: E402
from tunesmith.infer.settings import SamplingSettings  # noqa: E402

KEY = "sk-test-key"
GREEDY = SamplingSettings(do_sample=False, max_new_tokens=24)
QWEN_TAGS = call_tags(get_tool_format("qwen"))
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@dataclass
class Live:
    url: str
    engine: Any

    def client(self, key: str | None = KEY) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)

    def post(self, body: bytes | str, key: str | None = KEY) -> requests.Response:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        return requests.post(self.url + "/v1/chat/completions", data=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def live_factory() -> Iterator[Any]:
    """Starts create_app(engine, ...) under uvicorn in a thread on a free port; stops them all at the end."""
    servers: list[tuple[Any, threading.Thread]] = []

    def start(
        engine: Any, settings: SamplingSettings | None = None, api_key: str | None = KEY, app: Any = None
    ) -> Live:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        app = app or create_app(engine, settings or GREEDY, api_key)
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        servers.append((server, thread))
        return Live(f"http://127.0.0.1:{port}", engine)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def live(trained_full: Path, live_factory: Any) -> Live:
    cfg = tunesmith.load_config(None, [f"model_name_or_path={trained_full}", "template=qwen"])
    return live_factory(load_engine(cfg))


def _ask(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Name the capital city number {i}."}]


def _direct(engine: Any, messages: list[dict[str, Any]], settings: SamplingSettings = GREEDY) -> Completion:
    return engine.generate([engine.prompt_ids(messages)], settings)[0][0]


# ---- the trained model behind the live server ---------------------------------------------------


def test_models_health_and_a_greedy_answer(live: Live) -> None:
    client = live.client()
    assert [m.id for m in client.models.list().data] == [live.engine.name]
    assert requests.get(live.url + "/health", timeout=10).json()["status"] == "ok"
    r = client.chat.completions.create(model="anything", messages=_ask(1))
    choice = r.choices[0]
    reference = _direct(live.engine, _ask(1))
    assert choice.message.content == reference.text and reference.text.startswith("The capital is")
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert r.usage.prompt_tokens == len(live.engine.prompt_ids(_ask(1)))
    assert r.usage.completion_tokens == reference.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == live.engine.name and r.id.startswith("chatcmpl-")


def test_streaming_chunks_concatenate_to_the_greedy_answer(live: Live) -> None:
    client = live.client()
    plain = client.chat.completions.create(model="m", messages=_ask(2)).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="m", messages=_ask(2), stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == plain and sum(1 for p in pieces if p) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_n_with_sampling_and_a_seed(live: Live) -> None:
    client = live.client()
    ask = dict(model="m", messages=_ask(3), n=2, temperature=1.5, top_p=1.0, seed=11, max_tokens=12)
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content  # temperature 1.5
    assert first.usage.prompt_tokens == len(live.engine.prompt_ids(_ask(3)))  # the prompt counts once
    assert 2 <= first.usage.completion_tokens <= 24  # both answers' tokens


def test_stop_strings_and_length_limits(live: Live) -> None:
    client = live.client()
    full = client.chat.completions.create(model="m", messages=_ask(0)).choices[0].message.content
    word = full.split()[2]  # "The capital is X.": cut before X
    cut = client.chat.completions.create(model="m", messages=_ask(0), stop=word).choices[0]
    assert cut.message.content == full[: full.index(word)] and cut.finish_reason == "stop"
    for limit in ({"max_tokens": 2}, {"max_completion_tokens": 2}):
        short = client.chat.completions.create(model="m", messages=_ask(0), **limit)
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_a_missing_or_wrong_key_is_401_with_an_error_object(live: Live) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        live.client("sk-wrong").chat.completions.create(model="m", messages=_ask(0))
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    for r in (live.post(json.dumps({"messages": _ask(0)}), key=None), requests.get(live.url + "/v1/models")):
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert requests.get(live.url + "/v1/health", timeout=10).status_code == 401
    assert requests.get(live.url + "/health", timeout=10).status_code == 200  # probes need no key


BAD_REQUESTS = {
    "not json": ("{not json", None),
    "a list body": ("[1, 2]", None),
    "empty messages": ({"messages": []}, "messages"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    "n as a string": ({"messages": _ask(0), "n": "2"}, "n"),
    "n too big": ({"messages": _ask(0), "n": 1000, "temperature": 1.0}, "n"),
    "greedy n=2": ({"messages": _ask(0), "n": 2, "temperature": 0}, None),
    "logprobs": ({"messages": _ask(0), "logprobs": True}, "logprobs"),
    "unknown field": ({"messages": _ask(0), "frobnicate": 1}, "frobnicate"),
    "image part": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages.0.content.0.type",
    ),
    "user without content": ({"messages": [{"role": "user"}]}, "messages.0"),
    "forced tool call": ({"messages": _ask(0), "tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
    "streaming n=2": ({"messages": _ask(0), "n": 2, "temperature": 1.0, "stream": True}, "n"),
    "temperature too high": ({"messages": _ask(0), "temperature": 7}, "temperature"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_are_400_with_an_error_object_naming_the_field(live: Live, name: str) -> None:
    body, param = BAD_REQUESTS[name]
    r = live.post(body if isinstance(body, str) else json.dumps(body))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_the_user_field_is_ignored_and_unknown_routes_are_404_objects(live: Live) -> None:
    r = live.post(json.dumps({"messages": _ask(1), "user": "u-1", "metadata": {"a": "b"}}))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("The capital is")
    missing = requests.get(live.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_fifty_concurrent_clients_get_correct_answers_in_batches(live: Live) -> None:
    expected = {i: _direct(live.engine, _ask(i)).text for i in range(4)}
    before = requests.get(live.url + "/health", timeout=10).json()
    client = live.client()

    def one(k: int) -> tuple[int, str, str]:
        r = client.chat.completions.create(model="m", messages=_ask(k % 4))
        return k % 4, r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    assert all(text == expected[i] and finish == "stop" for i, text, finish in answers)
    health = requests.get(live.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["requests"] - before["requests"] == 50
    assert health["largest_batch"] > 1  # the burst shared generate calls
    assert health["batches"] - before["batches"] < 50


def test_tool_schemas_and_tool_history_are_rendered_through_the_template(live: Live) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = live.client().chat.completions.create(model="m", messages=history, tools=[WEATHER], max_tokens=4)
    canonical = [
        history[0],
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    prompt = live.engine.prompt_ids(canonical, tools=json.dumps([WEATHER]))
    text = live.engine.tokenizer.decode(prompt)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and json.dumps(WEATHER) in text
    assert r.usage.prompt_tokens == len(prompt)
    none = live.client().chat.completions.create(
        model="m", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=4
    )
    assert none.usage.prompt_tokens == len(live.engine.prompt_ids(canonical))  # 'none' leaves the schemas out


# ---- tool calls read back from the answer (a scripted engine writes them) ------------------------


@dataclass
class ScriptedEngine:
    """Answers with a fixed text (a tool call the tiny model would never write); 'boom' fails."""

    answer: str
    name: str = "scripted"
    template: Any = field(default_factory=lambda: get_template("qwen"))
    tokenizer: Any = None
    stop_ids: list[int] = field(default_factory=lambda: [0])
    description: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)

    def prompt_ids(self, messages: Sequence[Any], tools: str = "") -> list[int]:
        text = self.template.render(list(messages), tools=tools, add_generation_prompt=True).text
        self.prompts.append(text)
        return [ord(ch) for ch in text]

    def generate(self, prompts: Sequence[list[int]], settings: SamplingSettings) -> list[list[Completion]]:
        if any("boom" in "".join(map(chr, p)) for p in prompts):
            raise RuntimeError("the scripted engine exploded")
        return [[self._completion(p)] * settings.n for p in prompts]

    def stream(self, prompt: list[int], settings: SamplingSettings) -> Iterator[StreamEvent]:
        for i in range(0, len(self.answer), 5):  # pieces that cut through the tags
            yield StreamEvent(self.answer[i : i + 5])
        yield StreamEvent("", self._completion(prompt))

    def _completion(self, prompt: list[int]) -> Completion:
        return Completion(self.answer, [1] * len(self.answer), "stop", len(prompt), len(self.answer))


CALL_ANSWER = "Let me check.\n" + calls_text(
    get_tool_format("qwen"),
    "",
    [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
    ],
)


def test_tool_calls_in_the_answer_come_back_as_openai_tool_calls(live_factory: Any) -> None:
    live = live_factory(ScriptedEngine(CALL_ANSWER), api_key=None)
    client = live.client()
    r = client.chat.completions.create(model="m", messages=_ask(0), tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.type == "function" for c in calls)
    assert "<tools>" in live.engine.prompts[-1] and '"get_weather"' in live.engine.prompts[-1]
    plain = client.chat.completions.create(model="m", messages=_ask(0))  # no tools: the text as it is
    assert plain.choices[0].message.content == CALL_ANSWER and plain.choices[0].finish_reason == "stop"

    chunks = list(client.chat.completions.create(model="m", messages=_ask(0), tools=[WEATHER], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me check.\n" and "<tool" not in content
    assert [json.loads(tc.function.arguments)["city"] for tc in streamed] == ["Paris", "Oslo"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_an_engine_failure_is_a_500_object_and_the_server_keeps_serving(live_factory: Any) -> None:
    live = live_factory(ScriptedEngine("fine"), api_key=None)
    r = live.post(json.dumps({"messages": [{"role": "user", "content": "boom"}]}), key=None)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "exploded" in r.json()["error"]["message"]
    ok = live.client(None).chat.completions.create(model="m", messages=_ask(0))
    assert ok.choices[0].message.content == "fine"


def test_parser_reads_calls_and_leaves_broken_ones_as_text() -> None:
    content, calls = parse_tool_calls(CALL_ANSWER, QWEN_TAGS)
    assert content == "Let me check." and [c["arguments"]["city"] for c in calls] == ["Paris", "Oslo"]
    assert parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', QWEN_TAGS)[0] == ""
    for broken in (
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "f", "arguments": {}}',  # cut off by max_tokens
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f"}\n</tool_call> and then text',
    ):
        assert parse_tool_calls(broken, QWEN_TAGS) == (broken, [])
    assert parse_tool_calls("no calls here", QWEN_TAGS) == ("no calls here", [])


def test_stream_hold_never_sends_a_tag_and_gives_back_text_that_is_not_a_call() -> None:
    hold = StreamHold(QWEN_TAGS)
    sent = "".join(hold.feed(CALL_ANSWER[i : i + 3]) for i in range(0, len(CALL_ANSWER), 3))
    rest, calls = hold.finish()
    assert sent + rest == "Let me check.\n" and len(calls) == 2
    hold = StreamHold(QWEN_TAGS)
    pieces = [hold.feed(p) for p in ("a <tool", "_ca", "t> b")]
    assert pieces[0] == "a " and "".join(pieces) + hold.finish()[0] == "a <tool_cat> b"
    assert hold.finish()[1] == []


def test_the_config_gives_host_port_key_and_generation_defaults(
    trained_full: Path, live_factory: Any, capsys
) -> None:
    env = {"API_PORT": "9123", "API_KEY": KEY, "API_HOST": "0.0.0.0"}
    keys = [f"model_name_or_path={trained_full}", "template=qwen", "do_sample=false", "max_new_tokens=3"]
    app, host, port = prepare(tunesmith.config.load_config(None, keys, environ=env))
    assert (host, port) == ("0.0.0.0", 9123)
    out = capsys.readouterr().out
    assert "generation defaults: greedy, max_new_tokens=3" in out and '"backend": "huggingface"' in out
    live = live_factory(None, app=app)
    assert live.post(json.dumps({"messages": _ask(1)}), key=None).status_code == 401
    r = live.client().chat.completions.create(model="m", messages=_ask(1))
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_the_cli_serves_on_the_port_from_the_environment(trained_full: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"API_PORT": str(port), "API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tunesmith.cli", "api", f"model_name_or_path={trained_full}", "template=qwen",
           "do_sample=false", "max_new_tokens=16"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 45
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        answer = client.chat.completions.create(model="m", messages=_ask(2)).choices[0].message.content
        assert answer.startswith("The capital is")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "greedy, max_new_tokens=16" in out and '"backend": "huggingface"' in out
