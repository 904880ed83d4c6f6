"""Run in-process on one device, or relaunch the same command under torchrun on several.

The CLI calls ``maybe_relaunch(argv, os.environ, settings)`` first; ``None`` means "go on in this process".
Environment variables follow LLaMA-Factory's names (FORCE_TORCHRUN, NPROC_PER_NODE, NNODES, NODE_RANK,
MASTER_ADDR, MASTER_PORT) and are read in one place, ``read_launch_env``; the config's keys of the same names
(``LaunchSettings``) win over them. Without MASTER_PORT a free port is chosen.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import FrameType

from tunesmith.errors import TunesmithError

logger = logging.getLogger("tunesmith")

KILL_GRACE_S = 10.0  # SIGTERM -> SIGKILL delay when cleaning up the torchrun process group
_FORWARDED = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class LaunchEnv:
    """What the environment says about distributed launch; see ``read_launch_env``."""

    force_torchrun: bool = False
    nproc_per_node: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    rank: int = 0  # set by torchrun in its workers
    local_rank: int = 0  # rank within this node (torchrun's LOCAL_RANK)
    world_size: int = 1
    under_torchrun: bool = False  # LOCAL_RANK or WORLD_SIZE present: we are a worker, never relaunch

    @property
    def rendezvous(self) -> str:
        return f"{self.master_addr}:{self.master_port}" if self.master_port is not None else self.master_addr


def _int_var(env: Mapping[str, str], name: str, default: int | None, minimum: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise TunesmithError(
            f"environment variable {name}={raw!r} is not an integer >= {minimum}. "
            f"Fix: set {name} to a whole number (e.g. {name}={max(minimum, 1)}) or unset it."
        )
    return value


def read_launch_env(env: Mapping[str, str]) -> LaunchEnv:
    """The only place that reads launch-related environment variables."""
    force = env.get("FORCE_TORCHRUN", "").strip().lower()
    if force not in ("", "0", "1", "true", "false", "yes", "no"):
        raise TunesmithError(
            f"environment variable FORCE_TORCHRUN={force!r}: allowed 1/0, true/false, yes/no."
        )
    return LaunchEnv(
        force_torchrun=force in ("1", "true", "yes"),
        nproc_per_node=_int_var(env, "NPROC_PER_NODE", None, 1),
        nnodes=_int_var(env, "NNODES", 1, 1) or 1,
        node_rank=_int_var(env, "NODE_RANK", 0, 0) or 0,
        master_addr=env.get("MASTER_ADDR", "").strip() or "127.0.0.1",
        master_port=_int_var(env, "MASTER_PORT", None, 1),
        rank=_int_var(env, "RANK", 0, 0) or 0,
        local_rank=_int_var(env, "LOCAL_RANK", 0, 0) or 0,
        world_size=_int_var(env, "WORLD_SIZE", 1, 1) or 1,
        under_torchrun="LOCAL_RANK" in env or "WORLD_SIZE" in env,
    )


@dataclass(frozen=True)
class LaunchSettings:
    """What the config says about the launch: its nnodes/node_rank/master_* keys (None: from the environment)
    and whether the engine (DeepSpeed, FSDP) needs a process group even on one device."""

    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    needs_process_group: bool = False


def apply_settings(launch: LaunchEnv, settings: LaunchSettings) -> LaunchEnv:
    """The environment's launch settings with the config's explicit values on top."""
    given = {
        name: getattr(settings, name)
        for name in ("nnodes", "node_rank", "master_addr", "master_port")
        if getattr(settings, name) is not None
    }
    return replace(launch, **given)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def plan_launch(
    launch: LaunchEnv, device_count: int, settings: LaunchSettings | None = None
) -> LaunchEnv | None:
    """Decide: ``None`` runs in-process; otherwise the settings torchrun gets (port filled in).

    torchrun runs when several devices are visible, several nodes are asked for, FORCE_TORCHRUN is set,
    or the engine needs a process group (``settings.needs_process_group``).
    """
    if launch.under_torchrun:
        return None
    settings = settings or LaunchSettings()
    launch = apply_settings(launch, settings)
    wanted = launch.force_torchrun or device_count > 1 or launch.nnodes > 1 or settings.needs_process_group
    if not wanted:
        return None
    if launch.nnodes > 1 and (launch.master_port is None or launch.master_addr == "127.0.0.1"):
        raise TunesmithError(
            f"nnodes={launch.nnodes} needs master_addr (the address of node 0, reachable from every node) "
            "and master_port, the same on every node (config keys, or MASTER_ADDR/MASTER_PORT). "
            "Fix: e.g. MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 on all nodes, NODE_RANK=0..NNODES-1."
        )
    if launch.node_rank >= launch.nnodes:
        raise TunesmithError(
            f"node_rank {launch.node_rank} is not below nnodes {launch.nnodes}. "
            "Fix: number the nodes 0 to nnodes-1 (NODE_RANK or node_rank)."
        )
    nproc = launch.nproc_per_node or max(device_count, 1)
    port = launch.master_port if launch.master_port is not None else free_port(launch.master_addr)
    return LaunchEnv(
        force_torchrun=launch.force_torchrun,
        nproc_per_node=nproc,
        nnodes=launch.nnodes,
        node_rank=launch.node_rank,
        master_addr=launch.master_addr,
        master_port=port,
        world_size=nproc * launch.nnodes,
    )


def torchrun_command(plan: LaunchEnv, argv: list[str]) -> list[str]:
    """The torchrun command line that reruns ``argv`` (script path first, then its arguments)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(plan.nnodes),
        "--node_rank", str(plan.node_rank),
        "--nproc_per_node", str(plan.nproc_per_node),
        "--master_addr", plan.master_addr,
        "--master_port", str(plan.master_port),
        *argv,
    ]  # fmt: skip


def maybe_relaunch(
    argv: list[str], env: Mapping[str, str], settings: LaunchSettings | None = None
) -> int | None:
    """Return None to run in this process, or relaunch ``argv`` under torchrun and return its exit code.

    Example: ``rc = maybe_relaunch(sys.argv, os.environ); if rc is not None: sys.exit(rc)``
    """
    launch = read_launch_env(env)
    if launch.under_torchrun:
        return None
    import torch  # late: `tunesmith --help` and the data commands should not pay for it

    plan = plan_launch(launch, torch.cuda.device_count(), settings)
    if plan is None:
        return None
    cmd = torchrun_command(plan, argv)
    # Printed, not logged: this launching process never configures logging, and its line must show.
    print(
        f"[tunesmith] launching torchrun: world size {plan.world_size} ({plan.nnodes} node(s) x "
        f"{plan.nproc_per_node} process(es)), node rank {plan.node_rank}, rendezvous {plan.rendezvous}",
        file=sys.stderr,
        flush=True,
    )
    logger.debug("command: %s", " ".join(cmd))
    return run_process_group(cmd, dict(env))


def run_process_group(cmd: list[str], env: dict[str, str], grace_s: float = KILL_GRACE_S) -> int:
    """Run ``cmd`` in its own process group, forward SIGINT/SIGTERM to it, and kill the group on exit.

    A new session keeps the terminal's Ctrl-C from racing our forwarding; killing the whole group at the
    end removes any worker torchrun did not reap (e.g. torchrun itself was killed), which frees the port.
    Returns the command's exit code, or 128+N when it failed after we forwarded signal N (Ctrl-C: 130).
    """
    received: list[int] = []
    pgid: list[int] = []  # filled once the child exists; a signal before that only gets recorded

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if pgid:
            _signal_group(pgid[0], signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        pgid.append(proc.pid)
        if received:
            _signal_group(proc.pid, received[-1])
        try:
            rc = proc.wait()
        finally:
            _end_group(proc.pid, grace_s)
            proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if rc < 0:  # killed by signal N: report 128+N, as a shell does
        return 128 - rc
    return 128 + received[-1] if rc != 0 and received else rc


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the group; False when the group has no process left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # macOS reports a group of only zombies this way
        return False
    return True


def _end_group(pgid: int, grace_s: float) -> None:
    """SIGTERM every process of the group, then SIGKILL whatever is left after ``grace_s``."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.05)
    logger.warning("workers still alive %.0f s after SIGTERM; sending SIGKILL", grace_s)
    _signal_group(pgid, signal.SIGKILL)


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """True on global rank 0 (and when not distributed)."""
    return read_launch_env(os.environ if env is None else env).rank == 0


class _RankFilter(logging.Filter):
    """Drops records below WARNING on ranks other than 0, so each info line appears once."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def configure_logging(rank: int, world_size: int = 1, rendezvous: str = "", engine: str = "") -> None:
    """Send tunesmith's logs to stderr: info on rank 0, warnings and errors only (tagged) elsewhere.

    Calling it again replaces the handler it installed before. On rank 0 of a distributed run the first
    line states world size and rendezvous address.
    """
    root = logging.getLogger("tunesmith")
    for old in [h for h in root.handlers if h.get_name() == "tunesmith"]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("tunesmith")
    tag = f"[rank {rank}] " if world_size > 1 and rank != 0 else ""
    handler.setFormatter(logging.Formatter(f"[tunesmith] {tag}%(message)s"))
    handler.addFilter(_RankFilter(rank))
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    if world_size > 1:
        root.info(
            "distributed run: world size %d, rendezvous %s%s",
            world_size, rendezvous or "(unknown)", f", engine {engine}" if engine else "",
        )  # fmt: skip
