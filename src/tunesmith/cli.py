"""`tunesmith` command line: each subcommand is a thin call into the library.

User errors (TunesmithError) print their message without a traceback and exit 2; set
TUNESMITH_TRACEBACK=1 to see the traceback anyway.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from tunesmith import __version__
from tunesmith.errors import TunesmithError

USAGE = """tunesmith {version}

usage: tunesmith COMMAND [CONFIG] [key=value ...]

commands:
  check CONFIG [key=value ...]   preflight: config, datasets, rendered samples with masks, lengths (no weights)
  train CONFIG [key=value ...]   fine-tune (stage and method from the config)
  chat CONFIG [key=value ...]    chat with the model (and adapters) in the terminal, streaming
  api CONFIG [key=value ...]     OpenAI-compatible HTTP server (api_host, api_port, api_key)
  predict CONFIG [key=value ...] [--processes N] [--no-score]
                                 generate for eval_dataset (else dataset) into output_dir/predictions.jsonl
  score FILE [--help]            BLEU-4, ROUGE-1/2/L, exact match, choice accuracy of a predictions.jsonl
  export CONFIG [key=value ...]  merge adapters into the base and write a checked, servable model (export_dir)
  eval CONFIG [key=value ...]    multiple-choice benchmark (task: mmlu_test, cmmlu_val, ...) or task: perplexity
  webui [--host H] [--port P] [--root DIR] [--password PW] [--lang en|zh]
                                 the browser UI: train, evaluate & predict, chat, export, run history
                                 (pip install 'tunesmith[webui]'; binds 127.0.0.1:7860 by default)
  templates                      list the built-in chat templates
  version                        print versions of tunesmith and its main dependencies

CONFIG is a YAML or JSON file; key=value pairs override it (e.g. cutoff_len=1024 dataset=a,b).
"""


def _config_args(argv: list[str], command: str) -> tuple[str | None, list[str]]:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: tunesmith {command} CONFIG [key=value ...]")
        raise SystemExit(0 if argv else 2)
    path = None if "=" in argv[0] else argv[0]
    overrides = argv[1:] if path else argv
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise TunesmithError(f"expected key=value overrides after the config file, got {bad!r}")
    return path, overrides


def cmd_check(argv: list[str]) -> int:
    from tunesmith.check import run_check
    from tunesmith.config import load_config

    path, overrides = _config_args(argv, "check")
    return run_check(load_config(path, overrides))


def cmd_train(argv: list[str]) -> int:
    from tunesmith.config import load_config
    from tunesmith.launcher import is_main_process, maybe_relaunch
    from tunesmith.stages import run
    from tunesmith.training.distributed import end_process_group, launch_settings

    path, overrides = _config_args(argv, "train")
    cfg = load_config(path, overrides)  # before relaunching: a bad config is reported once, not per rank
    code = maybe_relaunch(["-m", "tunesmith.cli", "train", *argv], os.environ, launch_settings(cfg))
    if code is not None:
        return code
    for warning in cfg.warnings if is_main_process() else ():
        print(f"tunesmith train: warning: {warning}", file=sys.stderr)
    run(cfg)
    end_process_group()
    return 0


def cmd_chat(argv: list[str]) -> int:
    from tunesmith.config import load_config
    from tunesmith.infer.chat import chat

    path, overrides = _config_args(argv, "chat")
    return chat(load_config(path, overrides))


def cmd_api(argv: list[str]) -> int:
    from tunesmith.config import load_config
    from tunesmith.infer.api import serve

    path, overrides = _config_args(argv, "api")
    serve(load_config(path, overrides))
    return 0


def cmd_predict(argv: list[str]) -> int:
    from tunesmith.config import load_config
    from tunesmith.infer.predict import predict

    processes, score, rest = None, True, []
    args = iter(argv)
    for a in args:
        if a == "--no-score":
            score = False
        elif a == "--processes" or a.startswith("--processes="):
            value = a.partition("=")[2] or next(args, "")
            if not value.isdigit() or int(value) < 1:
                raise TunesmithError(f"--processes: expected a positive integer, got {value!r}")
            processes = int(value)
        else:
            rest.append(a)
    path, overrides = _config_args(rest, "predict")
    cfg = load_config(path, overrides)
    for warning in cfg.warnings:
        print(f"tunesmith predict: warning: {warning}", file=sys.stderr)
    predict(cfg, processes=processes, score=score)
    return 0


def cmd_score(argv: list[str]) -> int:
    import argparse
    import json

    from tunesmith.infer.score import Fields, score_file

    p = argparse.ArgumentParser(prog="tunesmith score", description="Score a predictions.jsonl file.")
    p.add_argument("file", help="predictions.jsonl (one JSON object a line)")
    p.add_argument("--predict-field", default="predict", help="field of the prediction (dotted: a.b)")
    p.add_argument("--label-field", default="label", help="field of the reference, e.g. extra.answer")
    p.add_argument("--id-field", default="id", help="field copied into each per-sample score line")
    p.add_argument("--bleu-tokens", choices=("chars", "words"), default="chars",
                   help="BLEU on characters (LLaMA-Factory's bleu-4) or on words")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    a = p.parse_args(argv)
    fields = Fields(a.predict_field, a.label_field, a.id_field, a.bleu_tokens)
    result = score_file(a.file, fields, workers=a.workers)
    print(json.dumps(result.summary, indent=1, ensure_ascii=False))
    print(f"tunesmith score: wrote {result.scores_path} and {result.summary_path}", file=sys.stderr)
    return 0


def _run_and_print(argv: list[str], command: str, run: Callable[[Any], Any]) -> int:
    """Load the config, say its warnings, run, and print the report's summary."""
    from tunesmith.config import load_config

    path, overrides = _config_args(argv, command)
    cfg = load_config(path, overrides)
    for warning in cfg.warnings:
        print(f"tunesmith {command}: warning: {warning}", file=sys.stderr)
    print(run(cfg).summary())
    return 0


def cmd_export(argv: list[str]) -> int:
    from tunesmith.export.run import run

    return _run_and_print(argv, "export", run)


def cmd_eval(argv: list[str]) -> int:
    from tunesmith.evaluation import run

    return _run_and_print(argv, "eval", run)


def cmd_webui(argv: list[str]) -> int:
    import argparse

    from tunesmith.webui import launch

    p = argparse.ArgumentParser(prog="tunesmith webui", description="The tunesmith browser UI.")
    p.add_argument("--host", default=os.environ.get("TUNESMITH_WEBUI_HOST", "127.0.0.1"),
                   help="address to bind; 0.0.0.0 exposes it (set --password then)")  # fmt: skip
    p.add_argument("--port", type=int, default=int(os.environ.get("TUNESMITH_WEBUI_PORT", "7860")))
    p.add_argument("--root", default="saves", help="folder of runs: new runs go here, history lists it")
    p.add_argument("--password", default=os.environ.get("TUNESMITH_WEBUI_PASSWORD"),
                   help="require a login with this password ($TUNESMITH_WEBUI_PASSWORD)")  # fmt: skip
    p.add_argument("--lang", choices=("en", "zh"), default="en")
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.password:
        print(f"tunesmith webui: warning: listening on {a.host} without --password", file=sys.stderr)
    launch(a.root, a.host, a.port, a.password, a.lang)
    return 0


def cmd_templates(argv: list[str]) -> int:
    from tunesmith.data.templates import get_template, list_templates

    for name in list_templates():
        t = get_template(name)
        extra = f" train_eos={t.train_eos!r}" if t.train_eos else ""
        print(f"{name:<20} stop={list(t.stop_words)}{extra}")
    return 0


def cmd_version(argv: list[str]) -> int:
    from tunesmith.runs import PACKAGES, package_versions

    print(f"tunesmith {__version__}")
    found = package_versions()
    for pkg in PACKAGES[1:]:
        print(f"{pkg} {found.get(pkg, '(not installed)')}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "check": cmd_check,
    "train": cmd_train,
    "chat": cmd_chat,
    "api": cmd_api,
    "predict": cmd_predict,
    "score": cmd_score,
    "export": cmd_export,
    "eval": cmd_eval,
    "webui": cmd_webui,
    "templates": cmd_templates,
    "version": cmd_version,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(version=__version__))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(
            f"tunesmith: unknown command {command!r}.{hint} Commands: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    try:
        return COMMANDS[command](rest)
    except TunesmithError as e:
        if os.environ.get("TUNESMITH_TRACEBACK"):
            raise
        print(f"tunesmith {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tunesmith {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
