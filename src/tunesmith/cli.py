"""`tunesmith` command line: each subcommand is a thin call into the library.

User errors (TunesmithError) print their message without a traceback and exit 2; set
TUNESMITH_TRACEBACK=1 to see the traceback anyway.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from tunesmith import __version__
from tunesmith.errors import TunesmithError

USAGE = """tunesmith {version}

usage: tunesmith COMMAND [CONFIG] [key=value ...]

commands:
  check CONFIG [key=value ...]   preflight: config, datasets, rendered samples with masks, lengths (no weights)
  train CONFIG [key=value ...]   fine-tune (stage and method from the config)
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
    from tunesmith.launcher import maybe_relaunch
    from tunesmith.stages import run

    code = maybe_relaunch(["-m", "tunesmith.cli", "train", *argv], os.environ)
    if code is not None:
        return code
    path, overrides = _config_args(argv, "train")
    cfg = load_config(path, overrides)
    for warning in cfg.warnings:
        print(f"tunesmith train: warning: {warning}", file=sys.stderr)
    run(cfg)
    return 0


def cmd_templates(argv: list[str]) -> int:
    from tunesmith.data.templates import get_template, list_templates

    for name in list_templates():
        t = get_template(name)
        print(f"{name:<20} stop={list(t.stop_words)}")
    return 0


def cmd_version(argv: list[str]) -> int:
    from importlib.metadata import PackageNotFoundError, version

    print(f"tunesmith {__version__}")
    for pkg in ("torch", "transformers", "tokenizers", "peft", "accelerate", "trl", "datasets", "pyarrow"):
        try:
            print(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            print(f"{pkg} (not installed)")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "check": cmd_check,
    "train": cmd_train,
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
