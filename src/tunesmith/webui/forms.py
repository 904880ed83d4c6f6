"""Form values to configs and back, previews: the plain-Python half of the web UI's forms.

The form fields are built from the config groups of ``tunesmith.config_schema`` (their types, defaults
and help texts) and from the installed ``transformers.TrainingArguments`` for the few HF keys a
training form shows, so a new config key appears in the UI without a change here.
"""

from __future__ import annotations

import dataclasses
import enum
import html
import json
import re
import shlex
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import orjson

from tunesmith.config import yaml_scalar, yaml_text
from tunesmith.config_schema import GROUPS, Stage
from tunesmith.config_types import Mismatch, choices_of, coerce, hf_training_fields
from tunesmith.errors import ConfigError, TunesmithError

__all__ = [
    "ALL_FIELDS",
    "FieldSpec",
    "TRAIN_FIELDS",
    "command_text",
    "config_errors",
    "dataset_names",
    "guess_template",
    "predictions_table",
    "preview_html",
    "train_config",
    "yaml_text",
]

STAGES: tuple[str, ...] = get_args(Stage)


@dataclass(frozen=True)
class FieldSpec:
    """One form field: a config key, how to edit it, its default and help, where it belongs."""

    key: str
    kind: str  # text | number | choice | bool
    choices: tuple[str, ...]  # kind "choice": the allowed values ("true"/"false" for an optional bool)
    default: Any  # as the form shows it: lists as a comma string, None when unset
    group: str  # model | data | method | lora | freeze | preference | rl | training | distributed | ...
    help: str
    stages: tuple[str, ...]  # the training stages it applies to; () = every stage


# transformers.TrainingArguments keys a training form shows (their types, defaults and help come from
# the installed transformers); every other HF key still works in a YAML file or as an extra override.
HF_TRAIN_KEYS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
    "optim", "bf16", "fp16", "logging_steps", "save_strategy", "save_steps", "save_total_limit",
    "eval_strategy", "eval_steps", "per_device_eval_batch_size", "report_to",
)  # fmt: skip

# Form group and stages of a finetuning key, by key prefix (first match wins; unmatched: "method").
_FINETUNING_RULES: tuple[tuple[tuple[str, ...], str, tuple[str, ...]], ...] = (
    (("lora_", "use_dora", "use_rslora", "pissa_", "loraplus_", "additional_target", "create_new_adapter"),
     "lora", ()),
    (("freeze_",), "freeze", ()),
    (("dpo_", "simpo_", "pref_loss"), "preference", ("dpo",)),
    (("kto_",), "preference", ("kto",)),
    (("pref_", "ref_model"), "preference", ("dpo", "kto")),
    (("reward_model", "ppo_"), "rl", ("ppo",)),
    (("num_generations", "grpo_"), "rl", ("grpo",)),
    (("reward_", "answer_column"), "rl", ("ppo", "grpo")),
)  # fmt: skip
_DISTRIBUTED = ("nnodes", "node_rank", "master_addr", "master_port")
# Config group attribute -> form group and stages, for the groups whose keys all share them.
_GROUP_OF = {"model": "model", "data": "data", "training": "training", "generation": "generation"}
_TRAIN_GROUPS = ("model", "data", "finetuning", "training", "generation")


def _plain_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return value


def _kind(annotation: Any) -> tuple[str, tuple[str, ...]]:
    choices = choices_of(annotation)
    if choices:
        return "choice", choices
    arms = set(get_args(annotation)) or {annotation}
    if arms == {bool}:
        return "bool", ()
    if arms == {bool, type(None)}:
        return "choice", ("true", "false")
    if arms - {type(None)} and arms - {type(None)} <= {int, float}:
        return "number", ()
    return "text", ()


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _finetuning_place(key: str) -> tuple[str, tuple[str, ...]]:
    for prefixes, group, stages in _FINETUNING_RULES:
        if key.startswith(prefixes):
            return group, stages
    return "method", ()


def _build_fields() -> tuple[tuple[FieldSpec, ...], dict[str, Any], dict[str, Any]]:
    """Every field (our groups, then HF_TRAIN_KEYS), each key's annotation and raw default."""
    specs: list[FieldSpec] = []
    annotations: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for attr, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "hf":
                continue
            if attr == "finetuning":
                group, stages = _finetuning_place(f.name)
            elif f.name in _DISTRIBUTED:
                group, stages = "distributed", ()
            else:
                group, stages = _GROUP_OF.get(attr, attr), ()
            kind, choices = _kind(hints[f.name])
            specs.append(
                FieldSpec(f.name, kind, choices, _plain_default(f.default), group, f.metadata["help"], stages)
            )
            annotations[f.name], defaults[f.name] = hints[f.name], f.default
    hf = hf_training_fields()
    for key in HF_TRAIN_KEYS:
        field = hf[key]
        kind, choices = _kind(field.annotation)
        choices = choices or tuple(map(str, field.choices))
        kind = "choice" if choices else kind
        specs.append(
            FieldSpec(key, kind, choices, _plain_default(field.default), "training",
                      _first_sentence(field.help), ())
        )  # fmt: skip
        annotations[key], defaults[key] = field.annotation, _plain_default(field.default)
    return tuple(specs), annotations, defaults


ALL_FIELDS, _ANNOTATIONS, _DEFAULTS = _build_fields()
_TRAIN_KEYS = {f.name for attr in _TRAIN_GROUPS for f in dataclasses.fields(GROUPS[attr])} | set(
    HF_TRAIN_KEYS
)
# The training form: model, data, method groups, training and the RL rollouts' generation settings.
TRAIN_FIELDS: tuple[FieldSpec, ...] = tuple(
    dataclasses.replace(f, stages=("ppo", "grpo")) if f.group == "generation" else f
    for f in ALL_FIELDS
    if f.key in _TRAIN_KEYS
)
_SPECS = {f.key: f for f in ALL_FIELDS}
_EMPTY = object()


def _parse(key: str, value: Any) -> Any:
    """A form value as the config key's type; _EMPTY for an empty one; unparsable values stay as given."""
    if isinstance(value, str):
        value = value.strip()
    if value is None or value == "" or value == [] or value == ():
        return _EMPTY
    if key not in _SPECS:
        return value
    annotation = _ANNOTATIONS[key]
    if _SPECS[key].choices == ("true", "false") and value in ("true", "false"):
        value = value == "true"
    if isinstance(value, float) and value.is_integer():
        try:  # number widgets give floats; an int key wants the int
            return coerce(int(value), annotation)
        except Mismatch:
            pass
    try:
        return coerce(value, annotation)
    except Mismatch:
        return value


def _is_default(key: str, value: Any) -> bool:
    if key not in _DEFAULTS:
        return False
    default = _DEFAULTS[key]
    if isinstance(value, bool) != isinstance(default, bool):
        return False  # False == 0 in Python, but `bf16: false` is not `max_steps: 0`
    return value == default or (isinstance(value, (list, tuple)) and tuple(value) == tuple(default or ()))


def train_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config of form values: typed as their keys, empty values and values equal to the default dropped.

    >>> train_config({"lora_rank": 8.0, "learning_rate": "1e-4", "dataset": "a, b", "template": ""})
    {'learning_rate': 0.0001, 'dataset': ['a', 'b']}
    """
    cfg: dict[str, Any] = {}
    for key, raw in values.items():
        value = _parse(key, raw)
        if value is _EMPTY or _is_default(key, value):
            continue
        cfg[key] = list(value) if isinstance(value, tuple) else value
    return cfg


def config_errors(cfg: dict[str, Any]) -> list[str]:
    """The problems ``tunesmith.load_config`` finds in ``cfg``, one line each; [] when it is valid."""
    from tunesmith.config import load_config

    try:
        load_config(None, cfg)
    except ConfigError as e:
        # "(override)" names where a value came from on a command line; the form has no such place.
        return [
            dataclasses.replace(p, message=p.message.removeprefix("(override) ")).render() for p in e.problems
        ]
    except TunesmithError as e:
        return [str(e)]
    return []


def _override_text(value: Any) -> str | None:
    """``value`` as the text after ``key=`` on a command line, or None when it has no such form."""
    if isinstance(value, (list, tuple)):
        items = [_override_text(v) for v in value]
        if any(i is None or "," in i for i in items):
            return None
        return ",".join(typing.cast(list[str], items))
    if isinstance(value, Mapping):
        return None
    if value is None:
        return "null"
    text = yaml_scalar(value)
    return text if "\n" not in text else None


def command_text(command: str, cfg: Mapping[str, Any], path: str = "config.yaml") -> str:
    """The CLI way to do what the UI does: the command, the YAML file it reads, and the key=value form."""
    lines = [f"tunesmith {command} {shlex.quote(path)}", "", f"# {path}", yaml_text(cfg).rstrip()]
    pairs = [(k, _override_text(v)) for k, v in cfg.items()]
    if all(text is not None for _, text in pairs):
        args = " ".join(shlex.quote(f"{k}={text}") for k, text in pairs)
        lines += ["", "# or, without a file:", f"tunesmith {command} {args}".rstrip()]
    return "\n".join(lines) + "\n"


def dataset_names(dataset_dir: str) -> list[str]:
    """The dataset names of ``dataset_dir/dataset_info.json`` in file order; [] when there is none."""
    try:
        info = json.loads((Path(dataset_dir) / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(name) for name in info] if isinstance(info, dict) else []


def guess_template(model: str) -> str:
    """The built-in template that renders like ``model``'s own chat template, or "auto".

    "auto" (train with the tokenizer's template) when the tokenizer cannot be loaded (no such folder,
    an uncached hub id while offline), has no chat template, or no built-in renders like it. Built-ins
    named in the model path are tried first, so e.g. qwen3 wins over an equal-rendering alias.
    """
    from transformers import AutoTokenizer

    from tunesmith.data.templates import compare_with_tokenizer, get_template, list_templates

    if not model.strip():
        return "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.strip())
    except (OSError, ValueError, KeyError):  # missing files, offline hub, bad id, unknown tokenizer class
        return "auto"
    if not tokenizer.chat_template or not isinstance(tokenizer.chat_template, str):
        return "auto"
    lowered = model.lower()
    names = sorted(list_templates(), key=lambda n: (n not in lowered, -len(n)))
    for name in names:
        try:
            if not compare_with_tokenizer(get_template(name), tokenizer):
                return name
        except TunesmithError:  # a template the tokenizer cannot bind (e.g. no bos token)
            continue
    return "auto"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUPERVISED = re.compile(r"⟦(.*?)(?:⟧|$)", re.DOTALL)


def preview_html(check_output: str) -> str:
    """``tunesmith check`` output as HTML: supervised text (between ⟦ and ⟧) in <mark>, sections bold."""
    text = html.escape(_ANSI.sub("", check_output))
    text = text.replace("between ⟦ and ⟧", '<mark class="ts-supervised">highlighted</mark>')  # the legend
    text = _SUPERVISED.sub(r'<mark class="ts-supervised">\1</mark>', text)
    text = re.sub(r"^(== .* ==)$", r"<b>\1</b>", text, flags=re.MULTILINE)
    return f'<pre class="ts-check">{text}</pre>'


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def predictions_table(path: Path, limit: int = 200, offset: int = 0) -> list[dict[str, Any]]:
    """Rows ``offset`` to ``offset + limit`` of a predictions.jsonl, with the per-sample scores of
    ``tunesmith score`` (``<stem>.scores.jsonl`` beside it) merged by id (nested ones as "choice.correct").

    Lines that are not JSON objects (e.g. one still being written) are skipped.
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    try:
        with path.open("rb") as f:
            seen = 0
            for line in f:
                if len(rows) >= limit:
                    break
                if not line.endswith(b"\n"):
                    break  # still being written
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    if seen >= offset:
                        rows.append(record)
                    seen += 1
    except OSError:
        return []
    scores = path.with_name(f"{path.name.removesuffix('.jsonl')}.scores.jsonl")
    wanted = {row["id"] for row in rows if isinstance(row.get("id"), (str, int))}
    if not wanted or not scores.is_file():
        return rows
    by_id: dict[Any, dict[str, Any]] = {}
    with scores.open("rb") as f:
        for line in f:
            try:
                score = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(score, dict) and isinstance(score.get("id"), (str, int)) and score["id"] in wanted:
                flat: dict[str, Any] = {}
                for key, value in score.items():
                    if key != "id":
                        _flat(key, value, flat)
                by_id[score["id"]] = flat
    return [row | by_id.get(row.get("id"), {}) for row in rows]
