"""launcher: the relaunch decision, and real torchrun runs on CPU with gloo (success, crash, Ctrl-C)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tunesmith.errors import TunesmithError
from tunesmith.launcher import (
    LaunchSettings,
    configure_logging,
    is_main_process,
    maybe_relaunch,
    plan_launch,
    read_launch_env,
    torchrun_command,
)

# Each worker writes "<pid> <MASTER_PORT>" to pids/<rank> once the process group is up.
_PRELUDE = """
import os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = Path(sys.argv[1]); (out / "pids").mkdir(exist_ok=True)
(out / "pids" / str(rank)).write_text(f"{os.getpid()} {os.environ['MASTER_PORT']}")
"""

ALL_REDUCE = (
    _PRELUDE
    + """
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
(out / f"sum{rank}").write_text(str(t.item()))
dist.destroy_process_group()
"""
)

RANK1_CRASHES = (
    _PRELUDE
    + """
if rank == 1:
    raise RuntimeError("rank 1 fails on purpose")
time.sleep(120)  # rank 0 would wait forever; torchrun must end it
"""
)

SLEEP = (
    _PRELUDE
    + """
dist.barrier()
(out / f"ready{rank}").write_text("1")
time.sleep(120)
"""
)


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT")
    }
    env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1", **extra)
    return env


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(body))
    return [str(path), str(tmp_path)]


def _workers(tmp_path: Path) -> list[tuple[int, int]]:
    files = sorted((tmp_path / "pids").glob("*"))
    return [tuple(int(x) for x in f.read_text().split()) for f in files]  # type: ignore[misc]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: TIME_WAIT leftovers of closed connections are fine, a listener is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        time.sleep(0.1)
    return alive


# --- the decision (pure) ---


def test_read_launch_env_defaults_and_values():
    assert read_launch_env({}) == read_launch_env({"FORCE_TORCHRUN": "0"})
    env = read_launch_env(
        {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "4", "NNODES": "2", "NODE_RANK": "1",
         "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    )  # fmt: skip
    assert (env.force_torchrun, env.nproc_per_node, env.nnodes, env.node_rank) == (True, 4, 2, 1)
    assert env.rendezvous == "10.0.0.1:29500" and not env.under_torchrun
    assert read_launch_env({"LOCAL_RANK": "0"}).under_torchrun
    assert read_launch_env({"LOCAL_RANK": "3", "WORLD_SIZE": "8"}).local_rank == 3
    assert read_launch_env({"WORLD_SIZE": "2", "RANK": "1"}).rank == 1


@pytest.mark.parametrize(
    "var,value", [("NPROC_PER_NODE", "two"), ("NPROC_PER_NODE", "0"), ("MASTER_PORT", "x")]
)
def test_bad_env_values_name_the_variable(var, value):
    with pytest.raises(TunesmithError, match=f"{var}={value!r}"):
        read_launch_env({var: value})


def test_plan_in_process_for_one_device_and_under_torchrun():
    assert plan_launch(read_launch_env({}), device_count=0) is None
    assert plan_launch(read_launch_env({}), device_count=1) is None
    assert plan_launch(read_launch_env({"FORCE_TORCHRUN": "1", "LOCAL_RANK": "0"}), device_count=8) is None


def test_plan_uses_all_gpus_and_picks_a_port():
    plan = plan_launch(read_launch_env({}), device_count=4)
    assert plan is not None and plan.nproc_per_node == 4 and plan.world_size == 4
    assert plan.master_port is not None and plan.master_port > 0
    cmd = torchrun_command(plan, ["train.py", "--x", "1"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-3:] == ["train.py", "--x", "1"]
    assert cmd[cmd.index("--master_port") + 1] == str(plan.master_port)


def test_plan_honours_user_settings():
    env = {
        "NPROC_PER_NODE": "2",
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.1.1.1",
        "MASTER_PORT": "1234",
    }
    plan = plan_launch(read_launch_env(env), device_count=8)
    assert plan is not None
    assert (plan.nproc_per_node, plan.nnodes, plan.node_rank, plan.world_size) == (2, 2, 1, 4)
    assert plan.rendezvous == "10.1.1.1:1234"


def test_multi_node_without_master_is_an_error():
    with pytest.raises(TunesmithError, match="MASTER_ADDR"):
        plan_launch(read_launch_env({"NNODES": "2"}), device_count=1)
    with pytest.raises(TunesmithError, match="master_addr"):  # nnodes from the config: the same check
        plan_launch(read_launch_env({}), device_count=1, settings=LaunchSettings(nnodes=2, master_port=1))


def test_config_launch_keys_win_over_the_environment():
    env = read_launch_env(
        {
            "NNODES": "2",
            "NODE_RANK": "0",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "1111",
            "NPROC_PER_NODE": "2",
        }
    )
    settings = LaunchSettings(node_rank=1, master_port=2222)
    plan = plan_launch(env, device_count=2, settings=settings)
    assert plan is not None
    assert (plan.nnodes, plan.node_rank, plan.rendezvous, plan.world_size) == (2, 1, "10.0.0.1:2222", 4)
    cmd = torchrun_command(plan, ["x.py"])
    assert cmd[cmd.index("--node_rank") + 1] == "1" and cmd[cmd.index("--master_port") + 1] == "2222"
    with pytest.raises(TunesmithError, match="node_rank 2 is not below nnodes 2"):
        plan_launch(env, device_count=2, settings=LaunchSettings(node_rank=2))


def test_engine_that_needs_a_process_group_relaunches_on_one_device():
    assert plan_launch(read_launch_env({}), device_count=1) is None
    plan = plan_launch(read_launch_env({}), device_count=1, settings=LaunchSettings(needs_process_group=True))
    assert plan is not None and plan.nproc_per_node == 1 and plan.master_port is not None


def test_is_main_process_and_logging(caplog):
    assert is_main_process({}) and is_main_process({"RANK": "0", "WORLD_SIZE": "2"})
    assert not is_main_process({"RANK": "1", "WORLD_SIZE": "2"})
    log = logging.getLogger("tunesmith")
    try:
        configure_logging(1, world_size=2, rendezvous="h:1")
        assert not log.isEnabledFor(logging.INFO) and log.isEnabledFor(logging.WARNING)
        configure_logging(0, world_size=2, rendezvous="h:1", engine="FSDP2")
        assert log.isEnabledFor(logging.INFO)
        assert len([h for h in log.handlers if h.get_name() == "tunesmith"]) == 1
    finally:
        for h in [h for h in log.handlers if h.get_name() == "tunesmith"]:
            log.removeHandler(h)
        log.setLevel(logging.NOTSET)
        log.propagate = True


# --- real torchrun runs (CPU, gloo) ---


def test_relaunch_runs_gloo_all_reduce(tmp_path, capfd):
    rc = maybe_relaunch(_script(tmp_path, ALL_REDUCE), _env())
    assert rc == 0
    port = _workers(tmp_path)[0][1]
    assert (
        f"launching torchrun: world size 2 (1 node(s) x 2 process(es)), node rank 0, rendezvous 127.0.0.1:{port}"
        in (capfd.readouterr().err)
    )
    assert [(tmp_path / f"sum{r}").read_text() for r in (0, 1)] == ["3.0", "3.0"]
    assert len({port for _, port in _workers(tmp_path)}) == 1, "both ranks share one rendezvous port"


def test_crash_of_one_rank_ends_all_and_frees_port(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    rc = maybe_relaunch(_script(tmp_path, RANK1_CRASHES), _env())
    assert rc not in (None, 0)
    workers = _workers(tmp_path)
    assert len(workers) == 2, "both ranks should have started"
    assert _wait_gone([pid for pid, _ in workers]) == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} - before == set()
    assert _port_is_free(workers[0][1])


def test_torchrun_itself_ends_surviving_workers_when_one_fails(tmp_path):
    """Upstream behaviour the launcher relies on first; its group kill is only the backstop."""
    plan = plan_launch(read_launch_env(_env()), device_count=0)
    assert plan is not None
    cmd = torchrun_command(plan, _script(tmp_path, RANK1_CRASHES))
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True)
    try:
        assert proc.wait(timeout=180) != 0
        assert _wait_gone([pid for pid, _ in _workers(tmp_path)], timeout=1.0) == []
    finally:  # on a failure or timeout above, leave no sleeping worker behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sigint_to_launcher_ends_all_ranks(tmp_path):
    launcher = (
        "import os, sys\nfrom tunesmith.launcher import maybe_relaunch\n"
        "sys.exit(maybe_relaunch(sys.argv[1:], os.environ))"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher, *_script(tmp_path, SLEEP)], env=_env())
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, "workers did not start"
            time.sleep(0.1)
        workers = _workers(tmp_path)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 128 + signal.SIGINT
    assert _wait_gone([pid for pid, _ in workers]) == []
    assert _port_is_free(workers[0][1])
