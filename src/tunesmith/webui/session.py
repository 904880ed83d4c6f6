"""The web UI's state and actions, without layout: the jobs it started, and what each button does.

Handlers in webui/app.py call these methods; each action writes a config and starts the CLI as a Job
(webui/jobs.py). A problem the user can fix is raised as ``gr.Error`` (Gradio shows it in the page).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import requests
import yaml

from tunesmith.errors import TunesmithError
from tunesmith.webui import forms, runs
from tunesmith.webui.jobs import Job

I18N_DIR = Path(__file__).with_name("i18n")
LANGS = ("en", "zh")
POLL_S = 1.5
HEALTH_TIMEOUT_S = 300.0  # model loading can be slow; the user can Unload meanwhile
CHECK_TIMEOUT_S = 600.0
CURVE_COLUMNS = ["step", "value", "metric"]


def load_strings(lang: str) -> dict[str, str]:
    """The UI strings of ``lang`` as flat ``section.key`` entries."""
    if lang not in LANGS:
        raise TunesmithError(f"lang: unknown language {lang!r}; allowed: {', '.join(LANGS)}")
    data = yaml.safe_load((I18N_DIR / f"{lang}.yaml").read_text(encoding="utf-8"))
    return {
        f"{section}.{key}": str(text) for section, entries in data.items() for key, text in entries.items()
    }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serving_config(run_dir: Path) -> dict[str, Any]:
    """Model keys that load what a training run wrote: its LoRA adapter on the base, or the full model."""
    cfg = runs.run_config(run_dir)
    adapters = cfg.get("adapter_name_or_path") or []
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    out: dict[str, Any] = {
        "model_name_or_path": cfg.get("model_name_or_path"),
        "template": cfg.get("template"),
    }
    if (run_dir / "adapter_config.json").exists():
        # as infer.predict.trained_config: training merged all given adapters but the last, unless it made a new one
        kept = adapters if cfg.get("create_new_adapter") else adapters[:-1]
        out["adapter_name_or_path"] = [*kept, str(run_dir)]
    else:
        out["model_name_or_path"] = str(run_dir)
    return {k: v for k, v in out.items() if v}


def curves_frame(curves: dict[str, list[tuple[int, float]]], prefix: str = "") -> pd.DataFrame:
    """Long-form (step, value, metric) rows of the loss curves, for gr.LinePlot."""
    rows = [(s, v, prefix + name) for name, pts in curves.items() if "loss" in name for s, v in pts]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def _split(text: str) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


@dataclass
class WebUI:
    """The app's state: the output root, its strings, and the jobs it started (one per slot)."""

    root: Path
    t: dict[str, str]
    jobs: dict[str, Job] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)
    chat_port: int | None = None

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def start(self, slot: str, command: str, cfg: dict[str, Any], extra_args: Sequence[str] = ()) -> Job:
        """Start ``tunesmith COMMAND`` for ``slot`` unless its job still runs; the previous one's log stays."""
        if slot in self.jobs and self.jobs[slot].running():
            raise gr.Error(self.t["common.busy"])
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.jobs[slot] = Job.start(command, cfg, self.jobs_dir, extra_args=extra_args)
        self.stopped.discard(slot)
        return self.jobs[slot]

    def stop_all(self) -> None:
        """Stop every job still running (the chat server, training, ...): none outlives the UI."""
        for slot in list(self.jobs):
            self.stop(slot)

    def stop(self, slot: str) -> str:
        job = self.jobs.get(slot)
        if job is not None and job.running():
            self.stopped.add(slot)
            job.stop()
        return self.status(slot)

    def status(self, slot: str) -> str:
        job = self.jobs.get(slot)
        if job is None:
            return self.t["common.idle"]
        code = job.returncode()
        if code is None:
            return self.t["common.running"].format(command=job.command_line())
        key = "finished" if code == 0 else "stopped" if slot in self.stopped else "failed"
        return self.t[f"common.{key}"].format(code=code)

    def log(self, slot: str) -> str:
        job = self.jobs.get(slot)
        return job.log_tail() if job is not None else ""

    def run_names(self) -> list[str]:
        return [r.name for r in runs.list_runs(self.root)]

    def run_dir(self, name: str | None) -> Path:
        if not name:
            raise gr.Error(self.t["common.no_run"])
        return self.root / name

    # -- Train --------------------------------------------------------------------------------------
    def train_config(self, values: dict[str, Any]) -> dict[str, Any]:
        """The train config of the form, with an output folder under the root when none is given."""
        cfg = forms.train_config(values) | {"do_train": True}
        if not cfg.get("output_dir"):
            name = f"{_stamp()}-{cfg.get('stage', 'sft')}-{cfg.get('finetuning_type', 'lora')}"
            cfg["output_dir"] = str(self.root / "runs" / name)
        return cfg

    def train_preview(self, values: dict[str, Any]) -> tuple[str, str, str]:
        """(YAML, command, problems) of the current form."""
        cfg = self.train_config(values)
        errors = forms.config_errors(cfg)
        problems = "\n".join([self.t["common.config_errors"], *(f"- {e}" for e in errors)]) if errors else ""
        return forms.yaml_text(cfg), forms.command_text("train", cfg), problems

    def train_check(self, values: dict[str, Any]) -> Iterator[str]:
        """Run `tunesmith check` on the form's config and yield the rendered samples as HTML."""
        yield f"<p>{self.t['train.preview_data_running']}</p>"
        job = self.start("check", "check", forms.train_config(values))
        deadline = time.monotonic() + CHECK_TIMEOUT_S
        while job.returncode() is None and time.monotonic() < deadline:
            time.sleep(0.3)
        if job.returncode() is None:
            self.stop("check")
        if job.returncode() != 0:
            head = self.t["train.preview_data_failed"].format(code=job.returncode())
            yield f"<p>{head}</p><pre>{_escape(job.log_tail())}</pre>"
            return
        yield forms.preview_html(job.log_tail())

    def train_start(self, values: dict[str, Any]) -> tuple[str, str, str, str]:
        """Start training; (status, note with the output folder, YAML, command)."""
        cfg = self.train_config(values)
        errors = forms.config_errors(cfg)
        if errors:
            raise gr.Error("\n".join([self.t["common.config_errors"], *errors]))
        job = self.start("train", "train", cfg)
        note = self.t["train.output_dir"].format(path=cfg["output_dir"])
        return (
            self.status("train"),
            note,
            forms.yaml_text(cfg),
            forms.command_text("train", cfg, str(job.config_path)),
        )

    def train_progress(self) -> str:
        job = self.jobs.get("train")
        p = job.progress() if job is not None else None
        if p is None:
            return self.t["train.waiting"] if job is not None and job.running() else ""
        speed = f"{p.tokens_per_s:.0f} tok/s" if p.tokens_per_s else "- tok/s"
        return self.t["train.progress_text"].format(
            step=p.step, total=p.total_steps, percent=p.percent, elapsed=_duration(p.elapsed_s),
            remaining=_duration(p.remaining_s), speed=speed, loss=_number(p.loss), eval_loss=_number(p.eval_loss),
        )  # fmt: skip

    def train_curves(self) -> pd.DataFrame:
        job = self.jobs.get("train")
        if job is None or job.output_dir is None:
            return pd.DataFrame([], columns=CURVE_COLUMNS)
        return curves_frame(runs.curves(job.output_dir))

    # -- Evaluate & Predict -------------------------------------------------------------------------
    def evaluate_start(self, run: str, mode: str, opts: dict[str, Any]) -> str:
        """Start `tunesmith predict` (mode predict) or `tunesmith eval` on the chosen run."""
        run_dir = self.run_dir(run)
        train_cfg = runs.run_config(run_dir)
        stage = "rm" if train_cfg.get("stage") == "rm" else "sft"  # predict scores pairs with a reward model
        cfg = serving_config(run_dir) | {"stage": stage, "max_new_tokens": int(opts["max_new_tokens"])}
        out = self.root / mode / f"{run_dir.name}-{_stamp()}"
        if mode == "eval":
            cfg |= {"task": opts["task"], "task_dir": opts["task_dir"], "n_shot": int(opts["n_shot"])}
            cfg["save_dir"] = str(out)
            self.start("evaluate", "eval", cfg)
            return self.status("evaluate")
        data = _split(opts["dataset"]) or train_cfg.get("eval_dataset") or train_cfg.get("dataset")
        cfg |= {
            "eval_dataset": data,
            "dataset_dir": opts["dataset_dir"] or train_cfg.get("dataset_dir", "data"),
        }
        cfg |= {"output_dir": str(out), "cutoff_len": train_cfg.get("cutoff_len", 2048)}
        if opts["max_samples"]:
            cfg["max_samples"] = int(opts["max_samples"])
        self.start("evaluate", "predict", cfg, extra_args=() if opts["score"] else ("--no-score",))
        return self.status("evaluate")

    def evaluate_results(self) -> tuple[pd.DataFrame, Any]:
        """Predictions next to references, and the score or benchmark summary, of the last job."""
        job = self.jobs.get("evaluate")
        if job is None or job.returncode() is None:
            return pd.DataFrame(), None
        if job.command == "eval":
            return pd.DataFrame(), _read_json(
                Path(str(_load_yaml(job.config_path)["save_dir"])) / "results.json"
            )
        out = job.output_dir or Path()
        preds = out / "predictions.jsonl"
        rows = forms.predictions_table(preds) if preds.is_file() else []
        # prediction and reference first; nested values (messages, extra) as JSON text: cells are scalars
        rows = [{"predict": r.get("predict"), "label": r.get("label")} | r for r in rows]
        table = pd.DataFrame([{k: v if _scalar(v) else _cell(v) for k, v in r.items()} for r in rows])
        return table, _read_json(out / "predictions.scores.json")

    # -- Chat ---------------------------------------------------------------------------------------
    def chat_load(self, model: str, adapters: str, template: str) -> Iterator[str]:
        """Start `tunesmith api` on a free port and yield statuses until /health answers."""
        if not model:
            raise gr.Error(self.t["common.no_model"])
        self.chat_unload()
        port = free_port()
        cfg: dict[str, Any] = {"model_name_or_path": model, "api_host": "127.0.0.1", "api_port": port}
        cfg |= {"adapter_name_or_path": _split(adapters)} if _split(adapters) else {}
        cfg |= {"template": template} if template else {}
        job = self.start("chat", "api", cfg)
        yield self.t["chat.loading"].format(port=port)
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while job.returncode() is None and time.monotonic() < deadline:
            if _healthy(port):
                self.chat_port = port
                yield self.t["chat.loaded"].format(port=port)
                return
            time.sleep(0.5)
        code = job.returncode()
        if code is None:
            job.stop()
            yield self.t["chat.load_timeout"].format(seconds=int(HEALTH_TIMEOUT_S))
        else:
            yield self.t["chat.load_failed"].format(code=code) + f"\n\n```\n{job.log_tail(4000)}\n```"

    def chat_unload(self) -> str:
        self.chat_port = None
        self.stop("chat")
        return self.t["chat.unloaded"]

    def chat_send(
        self, message: str, history: list[dict[str, Any]], system: str, sampling: dict[str, float]
    ) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """Stream the answer to ``message`` from the api server into the chat history."""
        if self.chat_port is None:
            raise gr.Error(self.t["chat.not_loaded"])
        history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield "", list(history)
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": m["role"], "content": _text(m["content"])} for m in history[:-1]]
        body = {"model": "tunesmith", "messages": messages, "stream": True} | sampling
        url = f"http://127.0.0.1:{self.chat_port}/v1/chat/completions"
        try:
            for delta in _stream_deltas(url, body):
                history[-1] = {"role": "assistant", "content": history[-1]["content"] + delta}
                yield "", list(history)
        except (requests.RequestException, ValueError) as e:
            history[-1] = {"role": "assistant", "content": self.t["chat.request_failed"].format(error=e)}
            yield "", list(history)

    # -- Export -------------------------------------------------------------------------------------
    def export_start(self, run: str, opts: dict[str, Any]) -> str:
        run_dir = self.run_dir(run)
        bits = opts["export_quantization_bit"]
        cfg = serving_config(run_dir) | {
            "export_dir": opts["export_dir"] or str(self.root / "export" / f"{run_dir.name}-{_stamp()}"),
            "export_size": int(opts["export_size"]),
            "export_device": opts["export_device"],
            "export_check": bool(opts["export_check"]),
            "export_legacy_format": bool(opts["export_legacy_format"]),
        }
        if bits and bits != "-":
            cfg["export_quantization_bit"] = int(bits)
        self.start("export", "export", cfg)
        return self.status("export")

    def export_report(self) -> Any:
        job = self.jobs.get("export")
        if job is None or job.returncode() is None:
            return None
        return _read_json(Path(str(_load_yaml(job.config_path)["export_dir"])) / "export_report.json")

    # -- Runs ---------------------------------------------------------------------------------------
    def runs_table(self) -> pd.DataFrame:
        t = self.t
        rows = [
            {
                t["runs.name"]: r.name,
                t["runs.status"]: r.status,
                t["runs.stage"]: r.stage,
                t["runs.method"]: r.method,
                t["runs.model"]: r.model,
                t["runs.dataset"]: r.dataset,
                t["runs.started"]: r.started,
                t["runs.steps"]: f"{r.step or 0}/{r.total_steps or '?'}",
                t["runs.metrics"]: ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items())),
            }  # fmt: skip
            for r in runs.list_runs(self.root)
        ]
        return pd.DataFrame(rows, columns=[t[f"runs.{c}"] for c in RUN_COLUMNS])

    def runs_select(self, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Curves of one run; for two, overlaid curves and the config keys that differ."""
        t = self.t
        diff = pd.DataFrame([], columns=[t["runs.key"], "A", "B"])
        if len(names) == 1:
            return curves_frame(runs.curves(self.root / names[0])), diff
        if len(names) != 2:
            return pd.DataFrame([], columns=CURVE_COLUMNS), diff
        cmp = runs.compare(self.root / names[0], self.root / names[1], self.root)
        frames = [
            curves_frame({metric: pts}, prefix=f"{run}: ") for metric, per_run in cmp.curves.items()
            for run, pts in per_run.items()
        ]  # fmt: skip
        rows = [(k, _cell(a), _cell(b)) for k, a, b in cmp.differing]
        diff = pd.DataFrame(rows, columns=[t["runs.key"], cmp.a.name, cmp.b.name])
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            [], columns=CURVE_COLUMNS
        ), diff


RUN_COLUMNS = ("name", "status", "stage", "method", "model", "dataset", "started", "steps", "metrics")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _cell(value: Any) -> str:
    return (
        ""
        if value is None
        else json.dumps(value, ensure_ascii=False)
        if not isinstance(value, str)
        else value
    )


def _text(content: Any) -> str:
    """A chatbot message's content as plain text (Gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


def _load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200
    except requests.RequestException:
        return False


def _stream_deltas(url: str, body: dict[str, Any]) -> Iterator[str]:
    """The content deltas of an OpenAI SSE chat completion stream."""
    with requests.post(url, json=body, stream=True, timeout=(5, 300)) as r:
        if r.status_code != 200:
            raise ValueError(f"HTTP {r.status_code}: {r.text[:500]}")
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            for choice in json.loads(data).get("choices", []):
                yield choice.get("delta", {}).get("content") or ""
