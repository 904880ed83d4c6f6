"""The exported model's README.md: what it is, how it was trained, what the export checks found, how to serve it.

``training_summary(folder)`` reads what a training run left (run.json, trainer_state.json,
all_results.json); ``render_card(CardData)`` is a pure function of data to text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys of a run's resolved config that describe the method; shown when set.
_METHOD_KEYS = (
    "stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora",
    "use_rslora", "pissa_init", "freeze_trainable_layers", "learning_rate", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "cutoff_len", "quantization_bit", "template",
)  # fmt: skip
_DATA_KEYS = ("dataset", "eval_dataset", "val_size", "max_samples")


@dataclass
class CardData:
    name: str
    base_model: str
    dtype: str
    template: str
    stop_tokens: list[str]
    adapters: list[dict[str, Any]] = field(default_factory=list)  # path, r, lora_alpha, target_modules
    training: list[dict[str, Any]] = field(default_factory=list)  # training_summary() of each run
    checks: list[str] = field(default_factory=list)  # one line per check result
    quantization_bit: int | None = None
    modelfile: bool = True


def training_summary(folder: str | Path) -> dict[str, Any] | None:
    """Method, data, steps and final metrics of the run that wrote ``folder``; None when it left no record."""
    folder = Path(folder)
    manifest = _read_json(folder / "run.json")
    state = _read_json(folder / "trainer_state.json")
    results = _read_json(folder / "all_results.json")
    if not (manifest or state or results):
        return None
    config = manifest.get("config", {})
    evals = [r for r in state.get("log_history", []) if any(k.startswith("eval_") for k in r)]
    metrics = dict(results or manifest.get("final_metrics", {}))
    if evals:
        metrics |= {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    return {
        "folder": str(folder),
        "status": manifest.get("status"),
        "method": _method(config),
        "data": {k: config[k] for k in _DATA_KEYS if config.get(k) not in (None, [], (), 0, 0.0)},
        "global_step": state.get("global_step"),
        "epoch": state.get("epoch"),
        "metrics": metrics,
        "packages": manifest.get("packages", {}),
    }


def _method(config: dict[str, Any]) -> dict[str, Any]:
    """The method keys that were set and apply to the run's finetuning_type (no False flags, no other method's knobs)."""
    kind = config.get("finetuning_type")
    other = {"lora": "freeze_", "freeze": "lora_", "full": ("lora_", "freeze_")}.get(kind, ())
    return {
        k: config[k]
        for k in _METHOD_KEYS
        if config.get(k) not in (None, [], (), False) and not (other and k.startswith(other))
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def render_card(d: CardData) -> str:
    """The model card as Markdown (YAML front matter for the hub, then the sections)."""
    quant = f", {d.quantization_bit}-bit bitsandbytes" if d.quantization_bit else ""
    lines = [
        "---",
        f"base_model: {d.base_model}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- tunesmith",
        *(["- lora"] if d.adapters else []),
        "---",
        "",
        f"# {d.name}",
        "",
        f"Exported by tunesmith from `{d.base_model}`"
        + (f" with {len(d.adapters)} LoRA adapter(s) merged" if d.adapters else "")
        + f" ({d.dtype}{quant}).",
        "",
        "## Model",
        "",
        f"- Base model: `{d.base_model}`",
        f"- Weights: {d.dtype}{quant}, safetensors",
        f"- Chat template: `{d.template}` (written into the tokenizer)",
        f"- Stop tokens: {', '.join(f'`{t}`' for t in d.stop_tokens) or 'none'} (generation_config.json)",
    ]
    for a in d.adapters:
        targets = a.get("target_modules")
        targets = ", ".join(targets) if isinstance(targets, list) else targets
        lines.append(
            f"- Adapter `{a['path']}`: LoRA r={a['r']}, alpha={a['lora_alpha']}"
            + (", rsLoRA" if a.get("use_rslora") else "")
            + (", DoRA" if a.get("use_dora") else "")
            + f", targets: {targets}"
        )
    lines += ["", "## Training", ""]
    if not d.training:
        lines.append("No training record (run.json / trainer_state.json) was found beside the weights.")
    for t in d.training:
        lines += _training_lines(t)
    lines += ["", "## Export checks", ""]
    lines += [f"- {c}" for c in d.checks] or ["- not run (export_check: false)"]
    lines += ["", "## Use", "", *_serving_lines(d)]
    return "\n".join(lines) + "\n"


def _training_lines(t: dict[str, Any]) -> list[str]:
    lines = [f"Run `{t['folder']}`" + (f" ({t['status']})" if t.get("status") else "") + ":", ""]
    data = t.get("data", {})
    if data:
        lines.append("- Data: " + "; ".join(f"{k}: {_fmt(v)}" for k, v in data.items()))
    method = t.get("method", {})
    if method:
        lines.append("- Method: " + ", ".join(f"{k}={_fmt(v)}" for k, v in method.items()))
    if t.get("global_step") is not None:
        epoch = t.get("epoch")
        lines.append(f"- Steps: {t['global_step']}" + (f" ({epoch:g} epochs)" if epoch is not None else ""))
    if t.get("metrics"):
        lines.append(
            "- Final metrics: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(t["metrics"].items()))
        )
    return lines + [""]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ", ".join(str(x) for x in v)
    return str(v)


def _serving_lines(d: CardData) -> list[str]:
    lines = [
        "From this folder (`.` below), with tunesmith:",
        "",
        "```bash",
        f"tunesmith chat model_name_or_path=. template={d.template}",
        f"tunesmith api model_name_or_path=. template={d.template}",
        "```",
        "",
        "With plain transformers (the chat template and stop tokens are in the folder):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained(".")',
        'model = AutoModelForCausalLM.from_pretrained(".")',
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,'
        ' return_tensors="pt", return_dict=True)',
        "print(tok.decode(model.generate(**ids, max_new_tokens=128)[0]))",
        "```",
        "",
        "With vLLM:",
        "",
        "```bash",
        "vllm serve ." + (" --quantization bitsandbytes" if d.quantization_bit else ""),
        "```",
    ]
    if d.modelfile:
        lines += [
            "",
            "With Ollama (after converting the weights to GGUF, or with an Ollama that imports safetensors):",
            "",
            "```bash",
            f"ollama create {d.name} -f Modelfile",
            f"ollama run {d.name}",
            "```",
        ]
    return lines
