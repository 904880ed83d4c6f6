"""Model tier: grpo and ppo through the public API on the tiny model (CPU), plus the reward functions.

The task: every prompt asks for "the magic number", whose answer (the `answer` column) is 7. A few SFT steps
teach the tiny model the form "The answer is X." with X one of 3, 5, 7, 9, so about a quarter of its samples
are right at the start and the reward has room to rise: RL must move the digit towards 7.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.training.helpers import train, tunesmith_messages

MAGIC = "7"
PAIRS_INFO = {
    "pairs": {
        "file_name": "pairs.json",
        "ranking": True,
        "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"},
    }
}
RL_RUN = {"template": "qwen", "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": 0}

# ---- reward functions (fast tier) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is 7.", "7"),
        ("so 1,000 + 2 = **1,002**.", "1002"),
        ("I think 3, no wait, 12.50", "12.5"),
        ("steps: 4 then 5\n#### 42\nextra 9", "42"),
        ("We get \\boxed{\\frac{1}{2}} and then 3", "\\frac{1}{2}"),
        ("nested \\boxed{a_{1}} last", "a_{1}"),
        ("Answer: Paris.\nbye 3", "paris"),
        ("the final answer is: $-3.0$", "-3"),
        ("no number here", "no number here"),
        ("<think>2+2</think><answer>4</answer>", "4"),
    ],
)
def test_extract_answer(text, expected):
    from tunesmith.training.rewards import extract_answer

    assert extract_answer(text) == expected


def test_exact_match_reads_the_answer_column_else_the_label():
    from tunesmith.training.rewards import exact_match

    completions = ["it is 7", "it is 7", "it is 8", "Answer: Rome"]
    cols = {"answer": ["7", None, "#### 8", None], "label_text": ["", "The answer is 7.", "", "rome"]}
    assert exact_match(completions, **cols) == [1.0, 1.0, 1.0, 1.0]
    assert exact_match(["3"], answer_column="gold", gold=["4"], label_text=["3"]) == [0.0]
    assert exact_match(["3"], answer_column="gold", label_text=["3"]) == [1.0]  # no such column: the label


def test_format_length_and_weighted_sum():
    from tunesmith.config_schema import FinetuningArgs
    from tunesmith.training.rewards import DEFAULT_FORMAT_PATTERN, RewardOptions, build_reward_funcs, score

    assert FinetuningArgs().reward_format_pattern == DEFAULT_FORMAT_PATTERN
    funcs = build_reward_funcs(["format", "length"], [2.0, 1.0], RewardOptions(length_target=4))
    texts = ["<think>a\nb</think>\n<answer>7</answer>", "7"]
    total, each = score(funcs, texts, {"completion_tokens": [6, 2], "label_text": ["", ""]})
    assert each == {"format": [1.0, 0.0], "length": [-0.5, 0.0]}
    assert total == [1.5, 0.0]


def test_reward_function_errors_name_the_function(tmp_path, monkeypatch):
    from tunesmith.errors import TunesmithError
    from tunesmith.training.rewards import RewardFunc, build_reward_funcs, score

    with pytest.raises(TunesmithError, match="neither a built-in"):
        build_reward_funcs(["exact"])
    with pytest.raises(TunesmithError, match="cannot import module 'no_such_mod_x'"):
        build_reward_funcs(["no_such_mod_x:f"])
    short = RewardFunc("short", lambda completions, **_: [1.0])
    with pytest.raises(TunesmithError, match="short: returned 1 values for 2"):
        score([short], ["a", "b"], {})
    nan = RewardFunc("nan", lambda completions, **_: [math.nan])
    with pytest.raises(TunesmithError, match="nan: every value must be a finite float"):
        score([nan], ["a"], {})


def test_group_advantages_and_gae():
    from tunesmith.training.grpo import group_advantages, k3_kl
    from tunesmith.training.ppo import gae

    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 3)
    assert adv[3:].abs().max() == 0  # a group whose rewards tie teaches nothing
    assert adv[0] > 0 > adv[1] and adv[:3].sum().abs() < 1e-6
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=0.5)
    assert advantages.tolist() == [[0.25, 0.5, 1.0, 0.0]]
    assert returns.tolist() == advantages.tolist()


# ---- stages (model tier) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """sft.json (the answer form), prompts.json (answer column, an extra `topic`), pairs for a reward model."""
    root = tmp_path_factory.mktemp("rl")
    q = "Question {}: what is the magic number?"
    sft = [{"instruction": q.format(i), "output": f"The answer is {'3579'[i % 4]}."} for i in range(32)]
    (root / "sft.json").write_text(json.dumps(sft))
    prompts = [
        {"instruction": q.format(i), "output": "", "answer": MAGIC, "topic": "magic"} for i in range(64)
    ]
    (root / "prompts.json").write_text(json.dumps(prompts))
    pairs = [
        {"instruction": q.format(i), "chosen": f"The answer is {MAGIC}.", "rejected": "The answer is 3."}
        for i in range(16)
    ]
    (root / "pairs.json").write_text(json.dumps(pairs))
    (root / "dataset_info.json").write_text(json.dumps(PAIRS_INFO))
    return root


@pytest.fixture(scope="module")
def policy_dir(tiny_model_dir, task_dir) -> Path:
    """The tiny model after a few full SFT steps: it answers in form, with a digit of 3, 5, 7, 9."""
    out = task_dir / "sft-model"
    train(
        tiny_model_dir, task_dir / "sft.json", out, finetuning_type="full", learning_rate=3e-3, max_steps=100
    )
    return out


def _logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line]


def _rollout_rewards(out: Path) -> list[float]:
    return [r["reward"] for r in _logs(out) if "reward" in r and r.get("eval_loss") is None]


def test_grpo_raises_the_exact_match_reward(policy_dir, task_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "grpo"
    train(
        policy_dir, task_dir / "prompts.json", out, stage="grpo", reward_funcs="exact_match",
        num_generations=8, per_device_train_batch_size=8, max_steps=24, learning_rate=5e-3,
        plot_loss=True, **RL_RUN,
    )  # fmt: skip
    logs = [r for r in _logs(out) if "reward" in r]
    rewards = [r["reward"] for r in logs]
    assert len(rewards) == 24
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as its reference
    for key in ("kl", "clip_ratio", "completion_length", "reward_std", "rewards/exact_match"):
        assert all(math.isfinite(r[key]) for r in logs), key
    assert all(r["clip_ratio"] == 0 for r in logs)  # one step per generation batch: the ratio is 1
    for name in ("training_loss.png", "training_reward.png", "training_kl.png"):
        assert (out / name).is_file(), name
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy_dir), out)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in merged.named_parameters())


REWARD_MODULE = """
import json
from pathlib import Path

from tunesmith.training.rewards import exact_match


def magic(completions, *, answer, topic, prompt_text, label_text, completion_tokens, **others):
    Path(__file__).with_name("seen.json").write_text(json.dumps(
        {"n": len(completions), "answer": answer[:2], "topic": topic[:2], "others": sorted(others),
         "prompt": prompt_text[0], "tokens": completion_tokens[:2]}))
    return exact_match(completions, answer=answer, label_text=label_text)
"""


def test_ppo_with_a_module_function_reward_raises_the_reward(policy_dir, task_dir, tmp_path, monkeypatch):
    (tmp_path / "rl_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "ppo"
    train(
        policy_dir, task_dir / "prompts.json", out, stage="ppo", reward_funcs="rl_test_rewards:magic",
        per_device_train_batch_size=64, ppo_epochs=2, max_steps=40, learning_rate=5e-3,
        ppo_kl_coef=0.1, ppo_target=None, **RL_RUN,
    )  # fmt: skip
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["n"] == 64 and seen["answer"] == [MAGIC, MAGIC] and seen["topic"] == ["magic", "magic"]
    assert "magic number" in seen["prompt"] and all(t >= 1 for t in seen["tokens"])
    assert {"prompt_messages", "row_source"} <= set(seen["others"])

    rewards = _rollout_rewards(out)
    assert len(rewards) == 20  # one rollout per ppo_epochs optimisation steps
    assert sum(rewards[-10:]) / 10 > sum(rewards[:3]) / 3 + 0.05, rewards
    logs = [r for r in _logs(out) if "policy_loss" in r]
    for key in ("policy_loss", "value_loss", "clip_ratio", "approx_kl"):
        assert all(math.isfinite(r[key]) for r in logs), key
    assert [r["kl_coef"] for r in logs if "kl_coef" in r] == pytest.approx([0.1] * 20)  # fixed KL coefficient
    assert (out / "value_head.safetensors").is_file() and (out / "adapter_model.safetensors").is_file()


def test_ppo_with_a_reward_model_of_stage_rm(policy_dir, task_dir, tmp_path):
    rm = tmp_path / "rm"
    train(policy_dir, Path("pairs"), rm, stage="rm", dataset="pairs", dataset_dir=str(task_dir), max_steps=4)
    out = tmp_path / "ppo"
    train(
        policy_dir, task_dir / "prompts.json", out, stage="ppo", reward_model=str(rm),
        per_device_train_batch_size=8, ppo_epochs=2, max_steps=4, learning_rate=5e-3, ppo_score_norm=True,
        ppo_whiten_rewards=True, val_size=8, per_device_eval_batch_size=8, eval_strategy="no", **RL_RUN,
    )  # fmt: skip
    logs = _logs(out)
    rollouts = [r for r in logs if "kl_coef" in r]
    assert len(rollouts) == 2
    for key in ("reward", "kl", "kl_coef", "completion_length"):
        assert all(math.isfinite(r[key]) for r in rollouts), key
    assert rollouts[1]["kl_coef"] != rollouts[0]["kl_coef"]  # adaptive (ppo_target 6 by default)
    results = json.loads((out / "all_results.json").read_text())
    assert math.isfinite(results["eval_reward"]) and results["eval_loss"] == pytest.approx(
        -results["eval_reward"]
    )


def test_ppo_checkpoints_hold_the_value_head_and_resume_repeats_the_steps(policy_dir, task_dir, tmp_path):
    out = tmp_path / "ppo"
    kw = dict(
        stage="ppo", reward_funcs="exact_match", per_device_train_batch_size=8, ppo_epochs=2, max_steps=4,
        learning_rate=5e-3, ppo_target=None, save_strategy="steps", save_steps=2, **RL_RUN,
    )  # fmt: skip
    train(policy_dir, task_dir / "prompts.json", out, **kw)
    first = [r["loss"] for r in _logs(out) if r.get("loss") is not None]
    assert (out / "checkpoint-2" / "value_head.safetensors").is_file()
    train(
        policy_dir, task_dir / "prompts.json", out, resume_from_checkpoint=str(out / "checkpoint-2"),
        overwrite_output_dir=False, **kw,
    )  # fmt: skip
    resumed = [r["loss"] for r in _logs(out) if r.get("loss") is not None][4:]
    assert resumed == pytest.approx(first[2:], abs=1e-5)


def test_config_checks_of_the_rl_stages():
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    base = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "do_train": True}
    with pytest.raises(ConfigError, match="stage grpo needs reward functions"):
        load_config(None, {**base, "stage": "grpo"})
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, {**base, "stage": "ppo", "reward_model": "rm", "reward_funcs": "exact_match"})
    with pytest.raises(ConfigError, match="2 weights for 1 reward_funcs"):
        load_config(None, {**base, "stage": "grpo", "reward_funcs": "format", "reward_weights": "1,2"})
    cfg = load_config(
        None, {**base, "stage": "grpo", "reward_funcs": "exact_match,my.mod:f", "temperature": 1.0}
    )
    assert cfg.finetuning.reward_funcs == ("exact_match", "my.mod:f")
    assert not any("temperature" in w for w in cfg.warnings)  # the rollouts' sampling setting


def test_grpo_with_fused_layers_generates_and_trains_as_the_plain_layers(policy_dir, task_dir, tmp_path):
    """fused_layers in an RL run: rollouts generate through the KV cache (the attention class's own forward)
    and the update runs the swapped layers; both give the plain layers' rewards and losses."""
    logs = {}
    for run, fused in (("plain", False), ("fused", True)):
        out = tmp_path / run
        with tunesmith_messages() as messages:
            train(policy_dir, task_dir / "prompts.json", out, stage="grpo", reward_funcs="exact_match",
                  num_generations=4, per_device_train_batch_size=4, max_steps=2, learning_rate=5e-3,
                  fused_layers=fused, **RL_RUN)  # fmt: skip
        logs[run] = [r for r in _logs(out) if "reward" in r]
        swapped = [m for m in messages if m.startswith("fused layers:") and "2 attentions with one RoPE" in m]
        assert len(swapped) == int(fused), messages
    assert len(logs["fused"]) == 2
    for want, got in zip(logs["plain"], logs["fused"]):
        assert got["reward"] == want["reward"] and got["completion_length"] == want["completion_length"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6)
