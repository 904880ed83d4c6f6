"""Resuming an RL run continues its algorithm state: PPO's adaptive KL coefficient and score moments.

Model tier: a PPO run with an adaptive KL coefficient and score normalisation, checkpointed halfway, is
resumed from that checkpoint into a fresh output dir; the resumed steps must log the uninterrupted run's
KL coefficient, rewards and losses. Fast tier: the state round-trips through JSON, and the score moments
are the same on every rank (the statistics of all ranks' scores).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from tests.training.helpers import train

# a reward that varies between samples, so that the score moments matter
REWARD_MODULE = "def chars(completions, **_):\n    return [len(c) / 8 for c in completions]\n"
PPO_RUN = {
    "stage": "ppo",
    "reward_funcs": "rl_resume_rewards:chars",
    "template": "qwen",
    "max_new_tokens": 8,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "per_device_train_batch_size": 16,
    "ppo_epochs": 1,
    "ppo_kl_coef": 0.2,
    "ppo_target": 0.5,
    "ppo_score_norm": True,
    "learning_rate": 5e-3,
    "max_steps": 4,
    "save_strategy": "steps",
    "save_steps": 2,
}


def _records(out: Path) -> dict[int, dict]:
    """Training log records with a loss, by step."""
    lines = (out / "trainer_log.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, filter(None, lines)) if r.get("loss") is not None}


def _whole_and_resumed(model: Path, tmp_path: Path, at: int, **overrides) -> tuple[dict, dict]:
    """Log records by step of a whole run and of the same run resumed from its checkpoint-`at`."""
    (tmp_path / "rl_resume_rewards.py").write_text(REWARD_MODULE)
    prompts = [{"instruction": f"Question {i}: say something.", "output": ""} for i in range(32)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    run = {**PPO_RUN, **overrides}
    whole = tmp_path / "whole"
    train(model, tmp_path / "prompts.json", whole, **run)
    resumed = tmp_path / "resumed"  # a fresh output dir: only the resumed steps are logged there
    checkpoint = str(whole / f"checkpoint-{at}")
    train(model, tmp_path / "prompts.json", resumed, resume_from_checkpoint=checkpoint, **run)
    return _records(whole), _records(resumed)


def test_ppo_resume_continues_the_kl_coefficient_and_score_moments(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    expected, got = _whole_and_resumed(tiny_model_dir, tmp_path, at=2)
    assert sorted(expected) == [1, 2, 3, 4] and sorted(got) == [3, 4]
    # the controller moved (else this test could not tell a restored coefficient from a restarted one)
    assert expected[3]["kl_coef"] != pytest.approx(PPO_RUN["ppo_kl_coef"], rel=1e-6)
    for step in (3, 4):
        assert got[step]["kl_coef"] == pytest.approx(expected[step]["kl_coef"], rel=1e-9), step
        for key in ("reward", "kl", "loss", "policy_loss", "value_loss"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-5), (step, key)


def test_ppo_resume_inside_a_cycle_moves_the_kl_coefficient_once_per_cycle(
    tiny_model_dir, tmp_path, monkeypatch
):
    """With ppo_epochs 2, a checkpoint after step 1 is inside the first cycle: the resumed run regenerates
    step 2's rollout, which must not update the coefficient a second time for that cycle."""
    monkeypatch.syspath_prepend(str(tmp_path))
    expected, got = _whole_and_resumed(tiny_model_dir, tmp_path, at=1, ppo_epochs=2, save_steps=1)
    # step 3 starts the second cycle: its coefficient has had exactly one update, in both runs; the
    # regenerated step 2 uses the checkpoint's coefficient, which holds that update already
    assert expected[3]["kl_coef"] != pytest.approx(PPO_RUN["ppo_kl_coef"], rel=1e-6)
    assert got[2]["kl_coef"] == pytest.approx(expected[3]["kl_coef"], rel=1e-9)
    assert got[3]["kl_coef"] == pytest.approx(expected[3]["kl_coef"], rel=1e-9)


def test_ppo_state_round_trips_through_json():
    from tunesmith.training.ppo import PPO, KLController

    def ppo(coef: float) -> PPO:
        return PPO(engine=None, settings=None, reference=None, kl=KLController(coef, 6.0), score_norm=True)

    trained = ppo(0.2)
    trained.kl.update(kl=9.0, n=64)
    trained.moments.update(torch.tensor([1.0, 2.0, 4.0]))
    fresh = ppo(0.2)
    fresh.load_state_dict(json.loads(json.dumps(trained.state_dict())))
    assert fresh.kl == trained.kl and fresh.moments == trained.moments
    assert fresh.kl.coef != 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moments_of_rank(rank: int, port: int, scores: list[list[float]], out: str) -> None:
    import torch.distributed as dist

    from tunesmith.training.ppo import RunningMoments

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(scores))
    try:
        moments = RunningMoments()
        moments.update(torch.tensor(scores[rank]))
        Path(out, f"{rank}.json").write_text(json.dumps([moments.mean, moments.var, moments.count]))
    finally:
        dist.destroy_process_group()


def test_score_moments_are_the_same_on_every_rank(tmp_path):
    from tunesmith.training.ppo import RunningMoments

    scores = [[1.0, 2.0, 3.0], [10.0, 20.0, 0.5]]
    # fork: the ranks inherit the imported torch (spawning re-imports it, ~10 s)
    torch.multiprocessing.start_processes(
        _moments_of_rank, args=(_free_port(), scores, str(tmp_path)), nprocs=len(scores), start_method="fork"
    )
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(len(scores))]
    single = RunningMoments()
    single.update(torch.tensor(scores[0] + scores[1]))
    for got in ranks:
        assert got == pytest.approx([single.mean, single.var, single.count], rel=1e-6)
