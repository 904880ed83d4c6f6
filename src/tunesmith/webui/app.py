"""The Gradio app: Train, Evaluate & Predict, Chat, Export and Runs tabs over the tunesmith CLI.

Every action writes a config and runs `python -m tunesmith.cli COMMAND CONFIG` as a Job (webui/jobs.py),
so nothing here is unavailable from the command line. UI strings come from i18n/<lang>.yaml.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tunesmith.errors import TunesmithError

try:
    import gradio as gr
except ImportError as e:  # the optional extra
    raise TunesmithError(
        "the web UI needs Gradio, which is not installed: install tunesmith[webui] "
        "(pip install 'tunesmith[webui]')"
    ) from e

from tunesmith.webui import forms  # noqa: E402 - after the check for the optional extra
from tunesmith.webui.session import POLL_S, WebUI, load_strings, serving_config  # noqa: E402

# -- Layout ---------------------------------------------------------------------------------------------
# Train-tab keys with their own widgets at the top; every other TRAIN_FIELDS entry goes in its group's accordion.
TOP_KEYS = ("model_name_or_path", "template", "dataset_dir", "dataset", "stage", "finetuning_type")
# Field groups that only apply to the finetuning_type of the same name.
METHOD_GROUPS = ("lora", "freeze")


@dataclass
class Server:
    """A UI being served: its Blocks, its state (jobs) and address; ``close()`` stops both."""

    demo: gr.Blocks
    ui: WebUI
    url: str

    def close(self) -> None:
        self.ui.stop_all()
        self.demo.close()


def serve(root: Path, host: str, port: int, password: str | None, lang: str, block: bool) -> Server:
    """Build the UI and serve it; with ``block`` until Ctrl-C, then every job it started is stopped."""
    demo, ui = build_app(root, lang)
    auth = (lambda _user, given: hmac.compare_digest(given.encode(), password.encode())) if password else None
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            auth=auth,
            auth_message=ui.t["app.login"],
            prevent_thread_lock=not block,
            quiet=not block,
            footer_links=["api"],
        )
    finally:
        if block:
            ui.stop_all()
    return Server(demo, ui, f"http://{host}:{port}/")


def build_app(root: Path, lang: str = "en") -> tuple[gr.Blocks, WebUI]:
    """The whole UI over output root ``root``, in language ``lang``, and the state its handlers share."""
    ui = WebUI(Path(root).expanduser().resolve(), load_strings(lang))
    t = ui.t
    with gr.Blocks(title=t["app.title"], analytics_enabled=False) as demo:
        gr.Markdown(f"## {t['app.title']}\n{t['app.intro'].format(root=ui.root)}", elem_id="app-title")
        timer = gr.Timer(POLL_S)
        with gr.Tabs():
            with gr.Tab(t["train.tab"], id="train", elem_id="tab-train"):
                _train_tab(ui, timer)
            with gr.Tab(t["evaluate.tab"], id="evaluate", elem_id="tab-evaluate") as tab:
                _evaluate_tab(ui, timer, tab)
            with gr.Tab(t["chat.tab"], id="chat", elem_id="tab-chat") as tab:
                _chat_tab(ui, tab)
            with gr.Tab(t["export.tab"], id="export", elem_id="tab-export") as tab:
                _export_tab(ui, timer, tab)
            with gr.Tab(t["runs.tab"], id="runs", elem_id="tab-runs") as tab:
                _runs_tab(ui, tab)
    return demo, ui


def _job_box(ui: WebUI, prefix: str) -> tuple[gr.Button, gr.Button, gr.Markdown]:
    """Start / Stop buttons and a status line, with ids ``<prefix>-start``, ``-stop``, ``-status``."""
    with gr.Row():
        start = gr.Button(ui.t["common.start"], variant="primary", elem_id=f"{prefix}-start")
        stop = gr.Button(ui.t["common.stop"], variant="stop", elem_id=f"{prefix}-stop")
    return start, stop, gr.Markdown(ui.t["common.idle"], elem_id=f"{prefix}-status")


def _log(ui: WebUI, prefix: str) -> gr.Code:
    return gr.Code(
        "", label=ui.t["common.log"], lines=12, max_lines=20, interactive=False, elem_id=f"{prefix}-log"
    )


def _run_picker(ui: WebUI, prefix: str, tab: gr.Tab) -> gr.Dropdown:
    """A dropdown of the runs under the root, refreshed when ``tab`` is selected or on its button."""
    with gr.Row():
        pick = gr.Dropdown(ui.run_names(), label=ui.t["common.run"], elem_id=f"{prefix}-run", scale=4)
        refresh = gr.Button(ui.t["common.runs_refresh"], elem_id=f"{prefix}-refresh", scale=1)
    for event in (tab.select, refresh.click):
        event(lambda: gr.update(choices=ui.run_names()), None, pick, show_progress="hidden")
    return pick


def applies(spec: forms.FieldSpec, stage: str, method: str) -> bool:
    """Whether a train field matters for ``stage`` and finetuning_type ``method``."""
    if spec.stages and stage not in spec.stages:
        return False
    return method == spec.group if spec.group in METHOD_GROUPS else True


def _field(spec: forms.FieldSpec, visible: bool) -> gr.components.Component:
    """The widget of one config key: labelled by the key itself, its help text as the info line."""
    kw = {"label": spec.key, "info": spec.help, "visible": visible, "elem_id": f"train-field-{spec.key}"}
    if spec.kind == "bool":
        return gr.Checkbox(bool(spec.default), **kw)
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices), value=spec.default, **kw)
    if spec.kind == "number" and spec.default is not None:  # unset numbers are text boxes: empty = unset
        return gr.Number(spec.default, **kw)
    return gr.Textbox("" if spec.default is None else str(spec.default), **kw)


def _train_fields(
    specs: dict[str, forms.FieldSpec], t: dict[str, str]
) -> tuple[dict[str, Any], dict[str, list[str]], list[Any]]:
    """Every TRAIN_FIELDS key but TOP_KEYS, in a closed accordion per group: widgets, group keys, accordions."""
    groups: dict[str, list[forms.FieldSpec]] = {}
    for spec in specs.values():
        if spec.key not in TOP_KEYS:
            groups.setdefault(spec.group, []).append(spec)
    first = (str(specs["stage"].default), str(specs["finetuning_type"].default))
    fields: dict[str, Any] = {}
    accordions = []
    for group, members in groups.items():
        label = f"{t['train.settings']}: {t.get(f'group.{group}', group)}"
        shown = [applies(spec, *first) for spec in members]
        with gr.Accordion(label, open=False, visible=any(shown), elem_id=f"train-group-{group}") as acc:
            accordions.append(acc)
            for spec, visible in zip(members, shown, strict=True):
                fields[spec.key] = _field(spec, visible)
    return fields, {g: [s.key for s in members] for g, members in groups.items()}, accordions


def _train_tab(ui: WebUI, timer: gr.Timer) -> None:
    t = ui.t
    specs = {s.key: s for s in forms.TRAIN_FIELDS}
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                model = gr.Textbox(label=t["common.model"], elem_id="train-model", scale=3)
                templates = ["auto", *_template_names()]
                template = gr.Dropdown(templates, value="auto", label=t["common.template"],
                                       allow_custom_value=True, elem_id="train-template", scale=1)  # fmt: skip
            with gr.Row():
                dataset_dir = gr.Textbox(specs["dataset_dir"].default, label=t["train.dataset_dir"],
                                         elem_id="train-dataset-dir")  # fmt: skip
                names = gr.Dropdown(forms.dataset_names(str(specs["dataset_dir"].default)), multiselect=True, label=t["train.dataset_names"],
                                    elem_id="train-dataset-names")  # fmt: skip
            dataset = gr.Textbox(label=t["train.dataset"], elem_id="train-dataset")
            with gr.Row():
                stage = gr.Dropdown(list(specs["stage"].choices), value=specs["stage"].default,
                                    label=t["train.stage"], elem_id="train-stage")  # fmt: skip
                method = gr.Dropdown(list(specs["finetuning_type"].choices), label=t["train.method"],
                                     value=specs["finetuning_type"].default, elem_id="train-method")  # fmt: skip
            fields, groups, accordions = _train_fields(specs, t)
        with gr.Column(scale=2):
            with gr.Row():
                preview = gr.Button(t["train.preview_config"], elem_id="train-preview")
                check = gr.Button(t["train.preview_data"], elem_id="train-check")
            start, stop, status = _job_box(ui, "train")
            log = _log(ui, "train")
            output = gr.Markdown(elem_id="train-output")
            progress = gr.Markdown(elem_id="train-progress")
            plot = gr.LinePlot(
                x="step", y="value", color="metric", label=t["train.curves"], elem_id="train-curves"
            )
    problems = gr.Markdown(elem_id="train-problems")
    with gr.Row():
        yaml_view = gr.Code(language="yaml", label=t["train.yaml"], interactive=False, elem_id="train-yaml")
        command = gr.Code(
            language="shell", label=t["common.command"], interactive=False, elem_id="train-command"
        )
    samples = gr.HTML(label=t["train.samples"], elem_id="train-samples")

    keys = [*TOP_KEYS, *fields]
    inputs = [model, template, dataset_dir, dataset, stage, method, *fields.values()]

    def values(*v: Any) -> dict[str, Any]:
        return dict(zip(keys, v, strict=True))

    def visibility(stage_v: str, method_v: str) -> list[Any]:
        shown = {k: applies(specs[k], stage_v, method_v) for k in fields}
        hidden_groups = [gr.update(visible=any(shown[k] for k in keys)) for keys in groups.values()]
        return [gr.update(visible=shown[k]) for k in fields] + hidden_groups

    def check_samples(*v: Any) -> Iterator[str]:
        yield from ui.train_check(values(*v))

    def tick(shown: int) -> tuple[Any, ...]:
        frame = ui.train_curves()  # the plot is only sent when it has new points (no redraw flicker)
        new_plot = frame if len(frame) != shown else gr.skip()
        return ui.status("train"), ui.train_progress(), ui.log("train"), new_plot, len(frame)

    model.blur(lambda m: gr.update(value=forms.guess_template(m)) if m else gr.skip(), model, template)
    dataset_dir.blur(lambda d: gr.update(choices=forms.dataset_names(d)), dataset_dir, names)
    names.input(lambda picked: ",".join(picked), names, dataset)
    for trigger in (stage.change, method.change):
        trigger(visibility, [stage, method], [*fields.values(), *accordions], show_progress="hidden")
    preview.click(lambda *v: ui.train_preview(values(*v)), inputs, [yaml_view, command, problems])
    check.click(check_samples, inputs, samples)
    start.click(lambda *v: ui.train_start(values(*v)), inputs, [status, output, yaml_view, command])
    stop.click(lambda: ui.stop("train"), None, status)
    shown = gr.State(0)
    timer.tick(tick, shown, [status, progress, log, plot, shown], show_progress="hidden")


def _template_names() -> list[str]:
    from tunesmith.data.templates import list_templates

    return list(list_templates())


def _evaluate_tab(ui: WebUI, timer: gr.Timer, tab: gr.Tab) -> None:
    t = ui.t
    run = _run_picker(ui, "evaluate", tab)
    choices = [(t["evaluate.mode_predict"], "predict"), (t["evaluate.mode_eval"], "eval")]
    mode = gr.Radio(choices, value="predict", label=t["evaluate.mode"], elem_id="evaluate-mode")
    with gr.Row() as predict_row:
        dataset = gr.Textbox(label=t["evaluate.dataset"], elem_id="evaluate-dataset", scale=3)
        dataset_dir = gr.Textbox("data", label=t["evaluate.dataset_dir"], elem_id="evaluate-dataset-dir")
        max_samples = gr.Number(0, precision=0, minimum=0, label=t["evaluate.max_samples"],
                                elem_id="evaluate-max-samples")  # fmt: skip
        score = gr.Checkbox(True, label=t["evaluate.score"])
    with gr.Row(visible=False) as eval_row:
        task = gr.Textbox("sample_test", label=t["evaluate.task"], elem_id="evaluate-task")
        task_dir = gr.Textbox("evaluation", label=t["evaluate.task_dir"])
        n_shot = gr.Number(0, precision=0, minimum=0, label=t["evaluate.n_shot"])
    max_new_tokens = gr.Number(128, precision=0, minimum=1, label=t["evaluate.max_new_tokens"],
                               elem_id="evaluate-max-new-tokens")  # fmt: skip
    start, stop, status = _job_box(ui, "evaluate")
    with gr.Row():
        results = gr.JSON(label=t["evaluate.results"], elem_id="evaluate-results", scale=1)
        table = gr.Dataframe(
            label=t["evaluate.predictions"], wrap=True, max_chars=300, elem_id="evaluate-predictions", scale=3
        )
    log = _log(ui, "evaluate")
    opts = [dataset, dataset_dir, max_samples, max_new_tokens, score, task, task_dir, n_shot]
    names = ("dataset", "dataset_dir", "max_samples", "max_new_tokens", "score", "task", "task_dir", "n_shot")

    def begin(run_v: str, mode_v: str, *v: Any) -> str:
        return ui.evaluate_start(run_v, mode_v, dict(zip(names, v, strict=True)))

    mode.change(lambda m: (gr.update(visible=m == "predict"), gr.update(visible=m == "eval")), mode,
                [predict_row, eval_row])  # fmt: skip
    start.click(begin, [run, mode, *opts], status)
    stop.click(lambda: ui.stop("evaluate"), None, status)
    timer.tick(lambda: (ui.status("evaluate"), ui.log("evaluate"), *ui.evaluate_results()),
               None, [status, log, table, results], show_progress="hidden")  # fmt: skip


def _chat_tab(ui: WebUI, tab: gr.Tab) -> None:
    t = ui.t
    run = _run_picker(ui, "chat", tab)
    with gr.Row():
        model = gr.Textbox(label=t["common.model"], elem_id="chat-model", scale=3)
        adapters = gr.Textbox(label=t["common.adapters"], elem_id="chat-adapters", scale=3)
        template = gr.Textbox(label=t["common.template"], elem_id="chat-template", scale=1)
    with gr.Row():
        load = gr.Button(t["chat.load"], variant="primary", elem_id="chat-load")
        unload = gr.Button(t["chat.unload"], variant="stop", elem_id="chat-unload")
    status = gr.Markdown(t["chat.unloaded"], elem_id="chat-status")
    with gr.Accordion(t["train.settings"], open=False):
        system = gr.Textbox(label=t["chat.system"], elem_id="chat-system")
        with gr.Row():
            temperature = gr.Slider(0.01, 2.0, 0.7, step=0.01, label=t["chat.temperature"])
            top_p = gr.Slider(0.01, 1.0, 0.9, step=0.01, label=t["chat.top_p"])
            max_tokens = gr.Slider(1, 4096, 256, step=1, label=t["chat.max_tokens"])
    chatbot = gr.Chatbot(label=t["chat.chatbot"], height=380, elem_id="chat-chatbot")
    with gr.Row():
        message = gr.Textbox(label=t["chat.message"], elem_id="chat-message", scale=5)
        send = gr.Button(t["chat.send"], variant="primary", elem_id="chat-send", scale=1)
        clear = gr.Button(t["chat.clear"], elem_id="chat-clear", scale=1)

    def fill(name: str) -> tuple[str, str, str]:
        cfg = serving_config(ui.run_dir(name))
        return (
            cfg.get("model_name_or_path", ""),
            ",".join(cfg.get("adapter_name_or_path", [])),
            cfg.get("template", ""),
        )

    def reply(msg: str, history: list[dict[str, Any]], sys_v: str, temp: float, p: float, n: float) -> Any:
        sampling = {"temperature": temp, "top_p": p, "max_tokens": int(n)}
        yield from ui.chat_send(msg, history, sys_v, sampling)

    run.input(fill, run, [model, adapters, template])
    load.click(ui.chat_load, [model, adapters, template], status)
    unload.click(ui.chat_unload, None, status)
    for trigger in (send.click, message.submit):
        trigger(reply, [message, chatbot, system, temperature, top_p, max_tokens], [message, chatbot])
    clear.click(lambda: [], None, chatbot)


def _export_tab(ui: WebUI, timer: gr.Timer, tab: gr.Tab) -> None:
    t = ui.t
    run = _run_picker(ui, "export", tab)
    with gr.Row():
        export_dir = gr.Textbox(label=t["export.export_dir"], elem_id="export-dir")
        size = gr.Number(5, precision=0, minimum=1, label=t["export.export_size"])
        bits = gr.Dropdown(["-", "4", "8"], value="-", label=t["export.export_quantization_bit"])
        device = gr.Dropdown(["cpu", "auto"], value="cpu", label=t["export.export_device"])
    with gr.Row():
        check = gr.Checkbox(True, label=t["export.export_check"])
        legacy = gr.Checkbox(False, label=t["export.export_legacy_format"])
    start, stop, status = _job_box(ui, "export")
    report = gr.JSON(label=t["export.report"], elem_id="export-report")
    log = _log(ui, "export")
    names = ("export_dir", "export_size", "export_quantization_bit", "export_device", "export_check",
             "export_legacy_format")  # fmt: skip

    def begin(run_v: str, *v: Any) -> str:
        return ui.export_start(run_v, dict(zip(names, v, strict=True)))

    start.click(begin, [run, export_dir, size, bits, device, check, legacy], status)
    stop.click(lambda: ui.stop("export"), None, status)
    timer.tick(lambda: (ui.status("export"), ui.log("export"), ui.export_report()),
               None, [status, log, report], show_progress="hidden")  # fmt: skip


def _runs_tab(ui: WebUI, tab: gr.Tab) -> None:
    t = ui.t
    refresh = gr.Button(t["common.runs_refresh"], elem_id="runs-refresh")
    table = gr.Dataframe(
        ui.runs_table(), label=t["runs.table"], interactive=False, wrap=True, elem_id="runs-table"
    )
    select = gr.Dropdown(
        ui.run_names(), multiselect=True, max_choices=2, label=t["runs.select"], elem_id="runs-select"
    )
    plot = gr.LinePlot(x="step", y="value", color="metric", label=t["runs.curves"], elem_id="runs-curves")
    diff = gr.Dataframe(label=t["runs.diff"], interactive=False, wrap=True, elem_id="runs-diff")

    def reload() -> tuple[pd.DataFrame, Any]:
        return ui.runs_table(), gr.update(choices=ui.run_names())

    for event in (tab.select, refresh.click):
        event(reload, None, [table, select], show_progress="hidden")
    select.change(lambda names: ui.runs_select(names or []), select, [plot, diff])
