"""The Gradio app without a browser: strings, building the Blocks, handlers called as functions."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from tunesmith.errors import TunesmithError
from tunesmith.webui import app, launch, session

APP_SOURCE = "".join(Path(m.__file__).read_text(encoding="utf-8") for m in (app, session))


def test_every_language_has_the_same_keys() -> None:
    en, zh = session.load_strings("en"), session.load_strings("zh")
    assert set(en) == set(zh)
    assert all(text.strip() for text in [*en.values(), *zh.values()])
    # placeholders are filled with the same names in both languages
    for key in en:
        assert set(re.findall(r"\{(\w+)", en[key])) == set(re.findall(r"\{(\w+)", zh[key])), key


def test_every_key_app_uses_exists() -> None:
    used = set(re.findall(r"\bt\[\s*[f]?[\"']([\w.]+)[\"']\s*\]", APP_SOURCE))
    used |= {f"common.{k}" for k in ("finished", "stopped", "failed")}  # status() builds these keys
    assert len(used) > 60
    assert used - set(session.load_strings("en")) == set()


def test_group_labels_cover_every_field_group() -> None:
    from tunesmith.webui.forms import TRAIN_FIELDS

    strings = session.load_strings("en")
    assert {f"group.{f.group}" for f in TRAIN_FIELDS} <= set(strings)


def test_unknown_language_is_an_error() -> None:
    with pytest.raises(TunesmithError, match="lang: unknown language 'fr'; allowed: en, zh"):
        session.load_strings("fr")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_build_app(tmp_path: Path, lang: str) -> None:
    demo, ui = app.build_app(tmp_path, lang)
    config = demo.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    for needed in (
        "train-model",
        "train-start",
        "train-curves",
        "chat-chatbot",
        "runs-table",
        "export-start",
    ):
        assert needed in ids
    labels = {c["props"].get("label") for c in config["components"]}
    assert session.load_strings(lang)["train.dataset"] in labels
    assert ui.status("train") == session.load_strings(lang)["common.idle"]


def test_fields_shown_follow_stage_and_method() -> None:
    from tunesmith.webui.forms import TRAIN_FIELDS

    spec = {f.key: f for f in TRAIN_FIELDS}
    assert app.applies(spec["lora_rank"], "sft", "lora")
    assert not app.applies(spec["lora_rank"], "sft", "full")
    assert app.applies(spec["freeze_trainable_layers"], "sft", "freeze")
    assert app.applies(spec["pref_beta"], "dpo", "lora")
    assert not app.applies(spec["pref_beta"], "sft", "lora")
    assert app.applies(spec["learning_rate"], "pt", "full")


def test_train_preview_writes_the_train_config(tmp_path: Path) -> None:
    ui = session.WebUI(tmp_path, session.load_strings("en"))
    values = {"model_name_or_path": "m", "dataset": "a.json", "template": "qwen", "max_steps": 12.0,
              "learning_rate": "1e-3", "lora_rank": 8, "output_dir": ""}  # fmt: skip
    text, command, problems = ui.train_preview(values)
    cfg = yaml.safe_load(text)
    assert cfg["max_steps"] == 12 and cfg["learning_rate"] == 1e-3 and cfg["do_train"] is True
    assert "lora_rank" not in cfg  # the default is left out
    assert Path(cfg["output_dir"]).parent == tmp_path / "runs"
    assert command.startswith("tunesmith train ")
    assert problems == ""
    _, _, problems = ui.train_preview(values | {"cutoff_len": -3})
    assert problems.startswith("The config has problems:") and "cutoff_len" in problems


def _write_run(folder: Path, losses: list[float], **config: object) -> Path:
    folder.mkdir(parents=True)
    cfg = {
        "model_name_or_path": "base",
        "template": "qwen",
        "finetuning_type": "lora",
        "stage": "sft",
    } | config
    (folder / "tunesmith_config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    (folder / "run.json").write_text(json.dumps({"status": "completed", "config": cfg}), encoding="utf-8")
    lines = [json.dumps({"step": i + 1, "total_steps": len(losses), "loss": v}) for i, v in enumerate(losses)]
    (folder / "trainer_log.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_serving_config_loads_what_training_wrote(tmp_path: Path) -> None:
    lora = _write_run(tmp_path / "lora", [1.0])
    (lora / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert session.serving_config(lora) == {
        "model_name_or_path": "base", "template": "qwen", "adapter_name_or_path": [str(lora)]
    }  # fmt: skip
    full = _write_run(tmp_path / "full", [1.0], finetuning_type="full")
    assert session.serving_config(full) == {"model_name_or_path": str(full), "template": "qwen"}
    stacked = _write_run(
        tmp_path / "stacked", [1.0], adapter_name_or_path=["a1", "a2"], create_new_adapter=True
    )
    (stacked / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert session.serving_config(stacked)["adapter_name_or_path"] == ["a1", "a2", str(stacked)]


def test_runs_table_and_comparison(tmp_path: Path) -> None:
    _write_run(tmp_path / "runs" / "a", [3.0, 2.0], learning_rate=0.1)
    _write_run(tmp_path / "runs" / "b", [3.0, 1.0, 0.5], learning_rate=0.2)
    ui = session.WebUI(tmp_path, session.load_strings("en"))
    table = ui.runs_table()
    assert sorted(table["name"]) == ["runs/a", "runs/b"] and set(table["status"]) == {"completed"}
    curves, diff = ui.runs_select(["runs/a"])
    assert list(curves["value"]) == [3.0, 2.0] and diff.empty
    curves, diff = ui.runs_select(["runs/a", "runs/b"])
    assert set(curves["metric"]) == {"runs/a: loss", "runs/b: loss"} and len(curves) == 5
    assert diff.values.tolist() == [["learning_rate", "0.1", "0.2"]]


class _FakeApi(BaseHTTPRequestHandler):
    """/v1/chat/completions answering "Hi there" as three SSE chunks, and recording the request."""

    requests: list[dict[str, object]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeApi.requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in ("Hi", " there", None):
            delta = {"content": piece} if piece else {}
            self.wfile.write(f"data: {json.dumps({'choices': [{'delta': delta}]})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_chat_streams_the_answer(tmp_path: Path, fake_api: int) -> None:
    ui = session.WebUI(tmp_path, session.load_strings("en"))
    with pytest.raises(Exception, match="Load a model first"):
        next(ui.chat_send("Hello", [], "", {}))
    ui.chat_port = fake_api
    steps = list(ui.chat_send("Hello", [], "Be brief.", {"temperature": 0.5, "max_tokens": 8}))
    answers = [history[-1]["content"] for _, history in steps]
    assert answers == ["", "Hi", "Hi there", "Hi there"]
    assert steps[-1][1][0] == {"role": "user", "content": "Hello"}
    sent = _FakeApi.requests[-1]
    assert sent["stream"] is True and sent["temperature"] == 0.5 and sent["max_tokens"] == 8
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]


def test_password_is_required(tmp_path: Path) -> None:
    server = launch(tmp_path, port=session.free_port(), password="s3cret", block=False)
    try:
        assert requests.get(server.url + "config", timeout=10).status_code == 401
        wrong = requests.post(server.url + "login", data={"username": "x", "password": "no"}, timeout=10)
        assert wrong.status_code != 200
        http = requests.Session()
        ok = http.post(server.url + "login", data={"username": "anyone", "password": "s3cret"}, timeout=10)
        assert ok.status_code == 200
        assert http.get(server.url + "config", timeout=10).status_code == 200
    finally:
        server.close()


def test_evaluate_and_export_run_the_cli_on_the_chosen_run(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "runs" / "a", [1.0], dataset=["d.json"], cutoff_len=64)
    (run / "adapter_config.json").write_text("{}", encoding="utf-8")
    ui = session.WebUI(tmp_path, session.load_strings("en"))
    opts = {"dataset": "", "dataset_dir": "", "max_samples": 4, "max_new_tokens": 8, "score": False,
            "task": "sample_test", "task_dir": "evaluation", "n_shot": 0}  # fmt: skip
    try:
        ui.evaluate_start("runs/a", "predict", opts)
        job = ui.jobs["evaluate"]
        cfg = yaml.safe_load(job.config_path.read_text(encoding="utf-8"))
        assert cfg["adapter_name_or_path"] == [str(run)] and cfg["eval_dataset"] == ["d.json"]
        assert (
            cfg["max_samples"] == 4 and cfg["cutoff_len"] == 64 and job.command_line().endswith("--no-score")
        )
        assert Path(cfg["output_dir"]).parent == tmp_path / "predict"
        with pytest.raises(Exception, match="still running"):  # the job is still importing torch
            ui.evaluate_start("runs/a", "eval", opts)
        assert ui.stop("evaluate").startswith("stopped")
        ui.evaluate_start("runs/a", "eval", opts)
        cfg = yaml.safe_load(ui.jobs["evaluate"].config_path.read_text(encoding="utf-8"))
        assert cfg["task"] == "sample_test" and Path(cfg["save_dir"]).parent == tmp_path / "eval"
        export = {"export_dir": "", "export_size": 2, "export_quantization_bit": "-", "export_device": "cpu",
                  "export_check": False, "export_legacy_format": False}  # fmt: skip
        ui.export_start("runs/a", export)
        cfg = yaml.safe_load(ui.jobs["export"].config_path.read_text(encoding="utf-8"))
        assert (
            cfg["export_size"] == 2 and cfg["export_check"] is False and "export_quantization_bit" not in cfg
        )
        assert ui.jobs["export"].command_line().startswith("tunesmith export ")
    finally:
        ui.stop_all()
    with pytest.raises(Exception, match="Choose a run first"):
        ui.export_start("", export)


def test_sample_preview_runs_tunesmith_check(tmp_path: Path, tiny_model: Path, sft_file: Path) -> None:
    ui = session.WebUI(tmp_path, session.load_strings("en"))
    values = {"model_name_or_path": str(tiny_model), "dataset": str(sft_file), "template": "chatml",
              "cutoff_len": 64}  # fmt: skip
    *_, html = ui.train_check(values)
    assert '<mark class="ts-supervised">The capital is Paris.' in html
    assert ui.jobs["check"].command_line().startswith("tunesmith check ")
