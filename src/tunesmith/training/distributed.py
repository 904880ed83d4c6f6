"""Multi-process engines and the data step of a distributed run.

Engines are chosen in the config with transformers' own keys, plus names for the common DeepSpeed setups:

    deepspeed: zero2 | zero3 | zero3_offload      # presets shipped in tunesmith/assets/deepspeed/*.json
    deepspeed: path/to/ds_config.json             # the user's own file, passed through unchanged
    fsdp: full_shard auto_wrap                    # FSDP2; words: full_shard, shard_grad_op, offload, auto_wrap
    fsdp_config: {...} or path/to/fsdp.json       # optional FSDP2 settings, as transformers reads them

"auto" values in a DeepSpeed file are filled by transformers from the TrainingArguments (batch sizes,
accumulation, clipping, precision). The ZeRO-3 offload preset keeps the trainer's own optimizer on the CPU
(``zero_force_ds_cpu_optimizer: false``) so `optim` and LoRA+ keep working without compiling DeepSpeed's
CPU Adam. Without an engine, several processes train with plain DDP.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.errors import TunesmithError
from tunesmith.launcher import LaunchSettings

if TYPE_CHECKING:
    from tunesmith.config import Config

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "assets" / "deepspeed"
FSDP2_WORDS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
_FSDP1_ONLY = ("no_shard", "hybrid_shard", "hybrid_shard_zero2")
# How long ranks wait for the rank that tokenizes. torchrun ends the waiting ranks at once if the preparing
# rank fails, so a long wait only matters for a preparation that is slow, never for one that crashed.
DATA_WAIT = timedelta(hours=24)


class EngineSettingError(TunesmithError):
    """A deepspeed/fsdp value tunesmith cannot use: what is wrong, what is allowed, how to fix it."""

    def __init__(self, reason: str, allowed: str = "", fix: str = "") -> None:
        self.reason, self.allowed, self.fix = reason, allowed, fix
        parts = [reason] + ([f"allowed: {allowed}"] if allowed else []) + ([f"fix: {fix}"] if fix else [])
        super().__init__(" | ".join(parts))


@dataclass(frozen=True)
class ZeroSettings:
    """What tunesmith needs to know of a DeepSpeed config: the ZeRO stage and what is offloaded."""

    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def label(self) -> str:
        offload = " (CPU offload)" if self.offload_optimizer or self.offload_param else ""
        return f"DeepSpeed ZeRO-{self.stage}{offload}"


def deepspeed_presets() -> dict[str, Path]:
    """Preset name -> its JSON file (the files in tunesmith/assets/deepspeed)."""
    return {p.stem: p for p in sorted(DEEPSPEED_DIR.glob("*.json"))}


def resolve_deepspeed(value: str | Mapping[str, Any]) -> str | dict[str, Any]:
    """A preset name -> its file path; a path to an existing file -> itself; a mapping -> a copy.

    Example: ``resolve_deepspeed("zero3")`` -> ``".../tunesmith/assets/deepspeed/zero3.json"``.
    """
    if isinstance(value, Mapping):
        return dict(value)
    presets = deepspeed_presets()
    if value in presets:
        return str(presets[value])
    if Path(value).expanduser().is_file():
        return str(Path(value).expanduser())
    close = difflib.get_close_matches(value, list(presets), n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise EngineSettingError(
        f"{value!r} is neither a tunesmith DeepSpeed preset nor an existing file "
        f"(relative paths are read from the current folder, {Path.cwd()})",
        allowed=f"{', '.join(presets)}, or a path to a DeepSpeed JSON file",
        fix=f"{hint}e.g. deepspeed: zero3",
    )


def read_deepspeed(value: str | Mapping[str, Any]) -> ZeroSettings:
    """The ZeRO stage and offloads of a preset name, a JSON file or a mapping."""
    resolved = resolve_deepspeed(value)
    if isinstance(resolved, dict):
        config = resolved
    else:
        try:
            config = json.loads(Path(resolved).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EngineSettingError(
                f"cannot read DeepSpeed config {resolved}: {e}", fix="give a readable JSON file"
            ) from e
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else None
    if not isinstance(zero, dict) or not isinstance(zero.get("stage", 0), int):
        raise EngineSettingError(
            f"DeepSpeed config {value!r}: zero_optimization must be a mapping with an integer stage",
            fix='e.g. "zero_optimization": {"stage": 2}, or use a preset (deepspeed: zero2)',
        )

    def offloaded(key: str) -> bool:
        device = zero.get(key, {}).get("device", "none") if isinstance(zero.get(key), dict) else "none"
        return device not in ("none", None)

    return ZeroSettings(int(zero.get("stage", 0)), offloaded("offload_optimizer"), offloaded("offload_param"))


def parse_fsdp(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The option words of an `fsdp` value ("full_shard auto_wrap"), checked for FSDP2."""
    words = tuple(value.split() if isinstance(value, str) else value)
    for word in words:
        if word in _FSDP1_ONLY:
            raise EngineSettingError(
                f"fsdp option {word!r} exists only in FSDP1, which transformers deprecates; tunesmith trains "
                "with FSDP2",
                allowed=", ".join(FSDP2_WORDS),
                fix="use full_shard (shard everything) or shard_grad_op (keep parameters after forward)",
            )
        if word not in FSDP2_WORDS:
            close = difflib.get_close_matches(word, FSDP2_WORDS, n=1)
            raise EngineSettingError(
                f"unknown fsdp option {word!r}",
                allowed=", ".join(FSDP2_WORDS),
                fix=f"did you mean {close[0]}?" if close else "e.g. fsdp: full_shard auto_wrap",
            )
    if "full_shard" in words and "shard_grad_op" in words:
        raise EngineSettingError(
            "fsdp has both full_shard and shard_grad_op", fix="keep one sharding strategy"
        )
    return words


def read_fsdp_config(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """fsdp_config as a dict (read from its JSON file when a path), `fsdp_` prefixes dropped as HF does."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        raw: Any = dict(value)
    else:
        try:
            raw = json.loads(Path(value).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EngineSettingError(
                f"cannot read fsdp_config {value!r}: {e}",
                fix="give a JSON file with FSDP2 settings, or a mapping",
            ) from e
    if not isinstance(raw, dict):
        raise EngineSettingError(
            "fsdp_config must be a mapping", fix='e.g. fsdp_config: {"activation_checkpointing": true}'
        )
    config = {k.removeprefix("fsdp_"): v for k, v in raw.items()}
    if str(config.get("version", 2)) != "2":
        raise EngineSettingError(
            f"fsdp_config version {config['version']!r}: tunesmith trains with FSDP2 "
            "(FSDP1 is deprecated in transformers)",
            allowed="2",
            fix="remove version from fsdp_config, or set it to 2",
        )
    return config


def fsdp2_config(
    fsdp: str | list[str] | tuple[str, ...], fsdp_config: str | Mapping[str, Any] | None
) -> dict[str, Any]:
    """The fsdp_config transformers gets: FSDP2, plus what the option words say (explicit settings win)."""
    words = parse_fsdp(fsdp)
    config = read_fsdp_config(fsdp_config)
    config["version"] = 2
    if "shard_grad_op" in words:
        config.setdefault("reshard_after_forward", False)
    if "offload" in words:
        config.setdefault("cpu_offload", True)
    return config


def engine_label(hf: Mapping[str, Any]) -> str:
    """The engine a TrainingArguments mapping selects, for the log: 'DDP', 'FSDP2', 'DeepSpeed ZeRO-3'."""
    if hf.get("deepspeed"):
        return read_deepspeed(hf["deepspeed"]).label
    if hf.get("fsdp"):
        offload = (
            " (CPU offload)" if fsdp2_config(hf["fsdp"], hf.get("fsdp_config")).get("cpu_offload") else ""
        )
        return f"FSDP2{offload}"
    return "DDP"


def needs_process_group(hf: Mapping[str, Any]) -> bool:
    """DeepSpeed and FSDP run only under a process group, even on one device."""
    return bool(hf.get("deepspeed") or hf.get("fsdp"))


def require_deepspeed() -> None:
    """Fail with the install hint when DeepSpeed is missing (checked before transformers imports it)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise TunesmithError(
            "deepspeed is set but the DeepSpeed package is not installed. "
            "Fix: pip install 'tunesmith[deepspeed]' (or remove deepspeed to train with DDP/FSDP)"
        )


def engine_kwargs(hf: Mapping[str, Any], world_size: int = 1, cuda: bool = True) -> dict[str, Any]:
    """TrainingArguments kwargs with the engine resolved: preset names -> files, fsdp words -> FSDP2 config.

    Several processes without CUDA get ``use_cpu: true``: accelerate makes a CPU (gloo) process group only
    then; without it every rank would silently train alone on the whole data.
    """
    kw = dict(hf)
    if world_size > 1 and not cuda:
        kw.setdefault("use_cpu", True)
    if kw.get("deepspeed"):
        require_deepspeed()
        kw["deepspeed"] = resolve_deepspeed(kw["deepspeed"])
    if kw.get("fsdp"):
        kw["fsdp_config"] = fsdp2_config(kw["fsdp"], kw.get("fsdp_config"))
        kw["fsdp"] = (
            True  # the option words now live in fsdp_config (transformers deprecates the string form)
        )
    return kw


@contextmanager
def local_main_first(local_rank: int, timeout: timedelta = DATA_WAIT) -> Iterator[bool]:
    """Let each node's local rank 0 run the block first; the other ranks run it after (reading its cache).

    The wait is a barrier on a separate gloo group with a long timeout, not on the training group, so a
    long tokenization cannot trip the NCCL/gloo timeout of the training process group (ddp_timeout).
    Yields True on the rank that goes first. Without a process group it just runs the block.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield True
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    first = local_rank == 0
    if not first:
        dist.barrier(group=group)
    yield first
    # Reached only when the block succeeded: a failing first rank exits, and torchrun ends the waiters.
    if first:
        dist.barrier(group=group)
    dist.destroy_process_group(group)


def end_process_group() -> None:
    """Destroy the default process group at the end of a successful run.

    A worker that exits with its gloo group alive can abort in the group's threads at interpreter exit
    ("terminate called without an active exception"), and torchrun then reports a finished run as failed
    (seen on 2 CPU ranks in CI). Only after success: after an error another rank may still be inside a
    collective, and the launcher ends every rank anyway.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_settings(cfg: Config) -> LaunchSettings:
    """The config's launch keys for ``maybe_relaunch``, and whether its engine needs a process group."""
    t = cfg.training
    return LaunchSettings(t.nnodes, t.node_rank, t.master_addr, t.master_port, needs_process_group(t.hf))
