"""Distributed training on CPU: engines by name, refused combinations, the data barrier, and 2 ranks == 1.

The engines themselves (DeepSpeed, FSDP2 on GPUs) run in bench/multi_gpu.py; here everything that needs no
GPU: what the config's names resolve to, which combinations are refused and why, that waiting ranks survive
a slow tokenizer, and that a 2-process gloo DDP run through the launcher reproduces a 1-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from tests.training.helpers import load_safetensors, logged_losses, run_config, train
from tunesmith.config import load_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.launcher import maybe_relaunch
from tunesmith.training.distributed import (
    DEEPSPEED_DIR,
    EngineSettingError,
    deepspeed_presets,
    engine_kwargs,
    engine_label,
    fsdp2_config,
    launch_settings,
    local_main_first,
    read_deepspeed,
    require_deepspeed,
    resolve_deepspeed,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DS3 = REPO / "examples" / "deepspeed" / "ds_z3_config.json"
NO_ENV: dict[str, str] = {}


def _launch_env(**extra: str) -> dict[str, str]:
    drop = ("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT", "MASTER_ADDR", "NNODES", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def _problems(overrides: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"model_name_or_path": "m", **overrides}, environ=NO_ENV)
    return {p.key: p.render() for p in excinfo.value.problems}


# --- engines by name ---


def test_deepspeed_presets_are_shipped_files_with_the_right_stage():
    presets = deepspeed_presets()
    assert set(presets) == {"zero2", "zero3", "zero3_offload"}
    assert all(p.parent == DEEPSPEED_DIR and p.is_file() for p in presets.values())
    assert read_deepspeed("zero2").stage == 2 and not read_deepspeed("zero2").offload_optimizer
    assert read_deepspeed("zero3").stage == 3 and not read_deepspeed("zero3").offload_param
    offload = read_deepspeed("zero3_offload")
    assert (offload.stage, offload.offload_optimizer, offload.offload_param) == (3, True, True)
    assert offload.label == "DeepSpeed ZeRO-3 (CPU offload)"
    for path in presets.values():  # every batch/precision value is left to transformers ("auto")
        config = json.loads(path.read_text())
        assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"]["enabled"] == "auto"


def test_deepspeed_names_resolve_and_user_files_pass_through(tmp_path):
    assert resolve_deepspeed("zero3") == str(DEEPSPEED_DIR / "zero3.json")
    own = tmp_path / "my_ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert resolve_deepspeed(str(own)) == str(own)
    assert read_deepspeed(str(own)).stage == 1
    assert resolve_deepspeed({"zero_optimization": {"stage": 2}}) == {"zero_optimization": {"stage": 2}}
    assert read_deepspeed(str(EXAMPLE_DS3)).stage == 3
    with pytest.raises(EngineSettingError, match="did you mean zero3") as excinfo:
        resolve_deepspeed("zer03")
    assert "zero2, zero3, zero3_offload" in excinfo.value.allowed


def test_missing_deepspeed_package_names_the_extra():
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(TunesmithError, match=r"pip install 'tunesmith\[deepspeed\]'"):
            require_deepspeed()
        with pytest.raises(TunesmithError, match="tunesmith"):
            engine_kwargs({"deepspeed": "zero2"})
    else:
        require_deepspeed()
        assert engine_kwargs({"deepspeed": "zero2"})["deepspeed"] == str(DEEPSPEED_DIR / "zero2.json")


def test_fsdp_words_become_an_fsdp2_config_that_transformers_accepts(tmp_path):
    from transformers import TrainingArguments

    assert fsdp2_config("full_shard auto_wrap", None) == {"version": 2}
    user = tmp_path / "fsdp.json"
    user.write_text(json.dumps({"fsdp_activation_checkpointing": True, "reshard_after_forward": True}))
    config = fsdp2_config("shard_grad_op auto_wrap offload", str(user))
    # the user's file wins over what the words imply; the fsdp_ prefix goes, as transformers does it
    assert config == {"activation_checkpointing": True, "reshard_after_forward": True, "version": 2,
                      "cpu_offload": True}  # fmt: skip
    kw = engine_kwargs({"fsdp": "shard_grad_op offload", "learning_rate": 1e-4})
    assert kw["fsdp"] is True and kw["learning_rate"] == 1e-4
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **kw)
    plugin = args.fsdp_plugin_args
    assert (plugin["fsdp_version"], plugin["reshard_after_forward"], plugin["cpu_offload"]) == (
        2,
        False,
        True,
    )
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"  # saved models are plain HF files
    assert engine_label({"fsdp": "full_shard offload"}) == "FSDP2 (CPU offload)"
    assert engine_label({}) == "DDP" and engine_label({"deepspeed": "zero2"}) == "DeepSpeed ZeRO-2"


def test_several_cpu_processes_get_a_cpu_process_group():
    assert engine_kwargs({}, world_size=2, cuda=False) == {"use_cpu": True}
    assert engine_kwargs({}, world_size=2, cuda=True) == {}
    assert engine_kwargs({}, world_size=1, cuda=False) == {}


def test_launch_settings_come_from_the_config():
    cfg = load_config(
        None, {"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 29500}, environ=NO_ENV
    )
    s = launch_settings(cfg)
    assert (s.nnodes, s.node_rank, s.master_addr, s.master_port, s.needs_process_group) == (
        2, 1, "10.0.0.1", 29500, False,
    )  # fmt: skip
    assert launch_settings(load_config(None, {"fsdp": "full_shard"}, environ=NO_ENV)).needs_process_group
    assert launch_settings(load_config(None, {}, environ=NO_ENV)).nnodes is None


# --- combinations refused at config load ---


@pytest.mark.parametrize(
    "overrides,key,needles",
    [
        ({"deepspeed": "zero3", "quantization_bit": 4}, "quantization_bit", ("ZeRO-3", "deepspeed: zero2")),
        ({"deepspeed": "zero3_offload", "quantization_bit": 4}, "quantization_bit", ("CPU offload", "zero2")),
        ({"fsdp": "full_shard auto_wrap", "quantization_bit": 4}, "quantization_bit", ("FSDP", "zero2")),
        ({"deepspeed": "zero2", "fsdp": "full_shard"}, "fsdp", ("one engine", "remove the other")),
        ({"deepspeed": "zero3", "pissa_init": True}, "pissa_init", ("partitioned", "pissa_init: false")),
        ({"deepspeed": "zero4"}, "deepspeed", ("zero4", "allowed: zero2, zero3, zero3_offload")),
        ({"deepspeed": "/no/such/ds.json"}, "deepspeed", ("current folder", "e.g. deepspeed: zero3")),
        ({"fsdp": "hybrid_shard"}, "fsdp", ("FSDP1", "full_shard")),
        ({"fsdp": "full_shrad"}, "fsdp", ("unknown fsdp option", "did you mean full_shard")),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "fsdp_config", ("FSDP2", "version")),
        ({"fsdp_config": {"version": 2}}, "fsdp_config", ("no effect without fsdp",)),
        ({"nnodes": 2, "node_rank": 2}, "node_rank", ("below nnodes", "0 to nnodes-1")),
    ],
)
def test_bad_engine_combinations_are_refused_with_a_fix(overrides, key, needles):
    problems = _problems(overrides)
    assert key in problems, problems
    assert all(needle in problems[key] for needle in needles), problems[key]
    assert "fix:" in problems[key]


@pytest.mark.parametrize(
    "overrides",
    [
        {"deepspeed": "zero2", "quantization_bit": 4},  # QLoRA under ZeRO-2 is fine
        {"deepspeed": "zero3", "finetuning_type": "full"},
        {"deepspeed": str(EXAMPLE_DS3)},
        {"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_activation_checkpointing": True}},
        {"fsdp": "full_shard", "pissa_init": True},  # FSDP shards after PiSSA has run on full weights
    ],
)
def test_good_engine_settings_load(overrides):
    cfg = load_config(None, {"model_name_or_path": "m", **overrides}, environ=NO_ENV)
    assert {k: cfg.to_flat_dict()[k] for k in overrides} == overrides


# --- the data step: waiting ranks outlive the training group's timeout ---

# rank 0 prepares for 12 s inside the block; the default group's timeout is 5 s
_SLOW_FIRST = """
import os, sys, time
from datetime import timedelta
from pathlib import Path
import torch.distributed as dist
dist.init_process_group("gloo", timeout=timedelta(seconds=5))
rank, out = dist.get_rank(), Path(sys.argv[1])
{wait}
(out / f"done{{rank}}").write_text("1")
"""
_OURS = """
from tunesmith.training.distributed import local_main_first
with local_main_first(int(os.environ["LOCAL_RANK"])) as first:
    if first:
        time.sleep(12)
"""
# what transformers' main_process_first does: a barrier on the training group itself
_DEFAULT_GROUP_BARRIER = """
if rank == 0:
    time.sleep(12)
dist.barrier()
"""


@pytest.mark.parametrize(
    "wait,survives", [(_OURS, True), (_DEFAULT_GROUP_BARRIER, False)], ids=["ours", "hf"]
)
def test_waiting_ranks_survive_a_preparation_longer_than_the_group_timeout(wait, survives, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_SLOW_FIRST.format(wait=textwrap.dedent(wait))))
    rc = maybe_relaunch([str(script), str(tmp_path)], _launch_env())
    done = sorted(p.name for p in tmp_path.glob("done*"))
    if survives:
        assert rc == 0 and done == ["done0", "done1"]
    else:  # proves the test can fail: the plain barrier times out on the waiting rank
        assert rc != 0 and "done1" not in done


def test_local_main_first_without_a_process_group_just_runs():
    with local_main_first(local_rank=3) as first:
        assert first


# --- 2 ranks (gloo DDP, through the launcher) == 1 rank with the same global batch ---


def _one_rank_and_two(
    model: Path, data: Path, tmp_path: Path, common: dict
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Train in-process on 1 rank (micro-batch 4), then through the launcher on 2 ranks (1 x 2 accumulation)."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(model, data, one, per_device_train_batch_size=4, **common)
    config = run_config(
        model, data, two, per_device_train_batch_size=1, gradient_accumulation_steps=2, **common
    )
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "tunesmith.cli", "train", str(tmp_path / "two.yaml")]
    proc = subprocess.run(cmd, env=_launch_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return one, two, proc


def test_two_ranks_match_one_rank_with_the_same_global_batch(tiny_model_dir, sft_data, tmp_path):
    """20 steps, fp32: per-step losses within 1e-5 relative and final weights within 1e-5 absolute.

    1 rank: micro-batch 4. 2 ranks: micro-batch 1 x 2 accumulation steps each. Both see the same 4 rows
    per step (accelerate's seeded sampler, batches dealt to ranks in turn), and the loss is normalised by
    the supervised tokens of all ranks' whole accumulation window (average_tokens_across_devices).
    Measured: 1.6e-7 relative on losses, 5e-7 absolute on weights.
    """
    common = dict(finetuning_type="full", max_steps=20, learning_rate=1e-3, lr_scheduler_type="cosine")
    one, two, proc = _one_rank_and_two(tiny_model_dir, sft_data, tmp_path, common)

    lines = [line for line in proc.stderr.splitlines() if line.startswith("[tunesmith]")]
    assert lines[0].startswith("[tunesmith] launching torchrun: world size 2")
    assert lines[1].startswith("[tunesmith] distributed run: world size 2, rendezvous 127.0.0.1:")
    assert lines[1].endswith("engine DDP")
    # only rank 0 logs progress (a second rank would repeat the line; progress bars may precede it)
    assert proc.stderr.count("[tunesmith] step 20/20 (100%) | epoch 5.00 | loss") == 1

    expected, got = logged_losses(one), logged_losses(two)
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 21))
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    a, b = load_safetensors(one / "model.safetensors"), load_safetensors(two / "model.safetensors")
    base = load_safetensors(tiny_model_dir / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
        assert (a[name] - base[name]).abs().max() > 1e-4, f"{name} did not train"


def test_two_ranks_train_lora_without_searching_for_unused_parameters(tiny_model_dir, sft_data, tmp_path):
    """LoRA under DDP runs with find_unused_parameters off (every adapter weight is used in every forward;
    a parameter without a gradient would make DDP raise at the next step) and matches one rank."""
    common = dict(finetuning_type="lora", max_steps=4, learning_rate=1e-2, lr_scheduler_type="constant")
    one, two, _ = _one_rank_and_two(tiny_model_dir, sft_data, tmp_path, common)
    args = torch.load(two / "training_args.bin", weights_only=False)
    assert args.ddp_find_unused_parameters is False and args.world_size == 2
    expected, got = logged_losses(one), logged_losses(two)
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)


@pytest.mark.slow
def test_multi_gpu_bench_cpu_smoke_runs_end_to_end(tmp_path):
    """bench/multi_gpu.py --cpu-smoke: the GPU benchmark's whole path (1 vs 2 processes, results file)."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "bench" / "multi_gpu.py"), "--cpu-smoke", "--methods", "lora",
           "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=_launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["runs"]] == ["ddp-lora-1proc", "ddp-lora-2proc"]
    assert all(r["steps"] == 3 and len(r["losses"]) == 3 for r in result["runs"])
    (comparison,) = result["comparisons"]
    assert comparison["losses_match"] and comparison["loss_max_rel_diff"] <= 1e-5
    assert "world size 2" in result["runs"][1]["launch_lines"][0]


def test_end_process_group_destroys_the_default_group_and_is_idempotent(tmp_path):
    import torch.distributed as dist

    from tunesmith.training.distributed import end_process_group

    end_process_group()  # no group: nothing to do
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert dist.is_initialized()
    end_process_group()
    assert not dist.is_initialized()
