"""Model tier: rm, dpo and kto through the public API on the tiny model (CPU), on a synthetic preference task.

The task: an answer calling a city "lovely" is preferred to one calling it "awful". Held-out pairs use
cities the training data never mentions, so a reward model above chance there learned the preference, not
the rows.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.training.helpers import load_safetensors, train, tunesmith_messages

TRAIN_CITIES = ("Paris", "Rome", "Oslo", "Lima", "Kyiv", "Bern")
HELD_OUT_CITIES = ("Tokyo", "Cairo", "Quito", "Delhi")
INFO = {
    "pairs": {
        "file_name": "pairs.json",
        "ranking": True,
        "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"},
    },
    "kto": {
        "file_name": "kto.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
        },
    },
}


def _pair(i: int, city: str) -> dict[str, str]:
    return {
        "instruction": f"Question {i}: tell me about {city}.",
        "chosen": f"{city} is lovely.",
        "rejected": f"{city} is awful.",
    }


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory) -> Path:
    """dataset_dir with `pairs` (ranking, alpaca) and `kto` (sharegpt, label column) over the same task."""
    root = tmp_path_factory.mktemp("pref")
    pairs = [_pair(i, TRAIN_CITIES[i % len(TRAIN_CITIES)]) for i in range(24)]
    (root / "pairs.json").write_text(json.dumps(pairs))
    kto = [
        {
            "messages": [
                {"role": "user", "content": p["instruction"]},
                {"role": "assistant", "content": p["chosen"] if i % 2 == 0 else p["rejected"]},
            ],
            "label": i % 2 == 0,
        }
        for i, p in enumerate(pairs)
    ]
    (root / "kto.json").write_text(json.dumps(kto))
    (root / "dataset_info.json").write_text(json.dumps(INFO))
    return root


@pytest.fixture(scope="module")
def competent_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model after a short SFT by our own sft stage on the task's format, with lovely and awful
    answers in equal numbers: it answers "<city> is ..." but prefers neither, so what rm, dpo and kto
    learn afterwards is the preference itself."""
    root = tmp_path_factory.mktemp("sft_first")
    pairs = [_pair(i, TRAIN_CITIES[i % len(TRAIN_CITIES)]) for i in range(24)]
    rows = [
        {"instruction": p["instruction"], "output": p["chosen"] if i % 2 == 0 else p["rejected"]}
        for i, p in enumerate(pairs)
    ]
    (root / "sft.json").write_text(json.dumps(rows))
    out = root / "out"
    train(tiny_model_dir, root / "sft.json", out, stage="sft", finetuning_type="full", learning_rate=1e-3,
          max_steps=20)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    """A second tiny model (another seed): a reference that differs from the policy from step 0."""
    from tunesmith.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_other") / "model", seed=1)


def _train(model: Path, pref_dir: Path, out: Path, stage: str, **overrides) -> None:
    dataset = "kto" if stage == "kto" else "pairs"
    train(model, Path(dataset), out, stage=stage, dataset=dataset, dataset_dir=str(pref_dir), **overrides)


def _logs(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line]
    return [r for r in records if r.get("loss") is not None]


def _held_out_batch(tokenizer, side: str) -> dict[str, torch.Tensor]:
    texts = []
    for i, city in enumerate(HELD_OUT_CITIES):
        p = _pair(100 + i, city)
        messages = [{"role": "user", "content": p["instruction"]}, {"role": "assistant", "content": p[side]}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_rm_beats_chance_on_held_out_pairs_and_loads_back(method, competent_model_dir, pref_dir, tmp_path):
    from transformers import AutoTokenizer

    from tunesmith.training.reward import load_reward_model

    out = tmp_path / "rm"
    lr = 1e-2 if method == "lora" else 1e-3
    _train(competent_model_dir, pref_dir, out, "rm", finetuning_type=method, learning_rate=lr, max_steps=20)

    logs = _logs(out)
    assert all(math.isfinite(r["loss"]) for r in logs)
    assert sum(r["rewards/accuracies"] for r in logs[-3:]) / 3 > 0.5
    head = load_safetensors(out / "value_head.safetensors")
    assert sorted(head) == ["v_head.summary.bias", "v_head.summary.weight"]
    assert (out / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")).is_file()

    scorer = load_reward_model(out, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(out)
    chosen = scorer(**_held_out_batch(tokenizer, "chosen"))
    rejected = scorer(**_held_out_batch(tokenizer, "rejected"))
    assert chosen.shape == (len(HELD_OUT_CITIES),)
    accuracy = (chosen > rejected).float().mean().item()
    assert accuracy >= 0.75, (chosen, rejected)


def test_dpo_lora_rewards_rise_with_adapter_disabled_reference(competent_model_dir, pref_dir, tmp_path):
    out = tmp_path / "dpo"
    _train(competent_model_dir, pref_dir, out, "dpo", pref_ftx=0.1, plot_loss=True)

    logs = _logs(out)
    assert len(logs) == 12
    # LoRA's B starts at 0: the policy equals its adapter-disabled reference at step 1
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logs[0]["loss"] == pytest.approx(math.log(2) + 0.1 * logs[0]["sft_loss"], abs=1e-4)
    late = logs[-4:]
    assert sum(r["rewards/margins"] for r in late) / 4 > 0.3
    assert sum(r["rewards/accuracies"] for r in late) / 4 > 0.9
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.2
    for name in ("training_loss.png", "training_rewards_margins.png", "training_rewards_accuracies.png"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize(
    "reference",
    [
        pytest.param({"finetuning_type": "lora"}, id="lora-adapter-disabled"),
        pytest.param({"finetuning_type": "full", "learning_rate": 1e-3}, id="full-frozen-copy"),
        pytest.param({"finetuning_type": "lora", "ref_model": "OTHER"}, id="lora-ref_model"),
    ],
)
def test_precomputed_reference_gives_the_live_reference_losses(
    reference, tiny_model_dir, other_model_dir, pref_dir, tmp_path
):
    """Same losses for the first steps: after step 1 the policy has moved, so a reference that moved with it
    (or rows given another row's reference values) would show."""
    reference = {k: str(other_model_dir) if v == "OTHER" else v for k, v in reference.items()}
    losses = {}
    for run in ("live", "precomputed", "cached"):  # the third run reads the second's values from the cache
        out = tmp_path / run
        _train(
            tiny_model_dir, pref_dir, out, "dpo", max_steps=3, pref_precompute_ref=run != "live", **reference
        )
        losses[run] = [r["loss"] for r in _logs(out)]
    assert losses["precomputed"] == pytest.approx(losses["live"], abs=1e-5)
    assert losses["cached"] == losses["precomputed"]
    cached = [
        p for p in (Path(os.environ["TUNESMITH_CACHE"]) / "reference").iterdir() if not p.name.startswith(".")
    ]
    assert len(cached) == 1 and (cached[0] / "columns.npz").is_file()
    if "ref_model" in reference:
        assert abs(losses["live"][0] - math.log(2)) > 1e-3  # the reference differs from the policy at step 1
    else:
        assert all(abs(loss - math.log(2)) > 1e-4 for loss in losses["live"][1:])


def test_kto_logs_finite_kl_and_rewards(competent_model_dir, pref_dir, tmp_path):
    out = tmp_path / "kto"
    _train(competent_model_dir, pref_dir, out, "kto", kto_rejected_weight=1.5, val_size=0.25)

    logs = _logs(out)
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
        values = [r[key] for r in logs if key in r]
        assert values and all(math.isfinite(v) for v in values), key
    assert logs[-1]["loss"] < logs[0]["loss"]
    late = [r["rewards/margins"] for r in logs[-4:] if "rewards/margins" in r]
    assert late and sum(late) / len(late) > 0
    results = json.loads((out / "all_results.json").read_text())
    assert math.isfinite(results["eval_loss"]) and math.isfinite(results["eval_kl"])


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_reference_free_losses_load_no_reference(loss, tiny_model_dir, pref_dir, tmp_path):
    out = tmp_path / loss
    # a ref_model that cannot load proves none is loaded; full tuning would otherwise copy the policy
    _train(
        tiny_model_dir,
        pref_dir,
        out,
        "dpo",
        pref_loss=loss,
        finetuning_type="full",
        learning_rate=1e-3,
        max_steps=6,
        ref_model=str(tmp_path / "no-such-model"),
    )
    logs = _logs(out)
    assert all(math.isfinite(r["loss"]) for r in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]


@pytest.mark.parametrize("stage,dataset", [("dpo", "dpo_en_demo"), ("kto", "kto_en_demo")])
def test_llamafactory_demo_data_trains(stage, dataset, lf_data, tiny_model_dir, tmp_path):
    out = tmp_path / stage
    train(
        tiny_model_dir,
        Path(dataset),
        out,
        stage=stage,
        dataset=dataset,
        dataset_dir=str(lf_data),
        max_samples=16,
        cutoff_len=128,
        max_steps=3,
        per_device_train_batch_size=2,
    )
    logs = _logs(out)
    assert len(logs) == 3 and all(math.isfinite(r["loss"]) for r in logs)
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_rm_resumes_from_its_checkpoint_layout(method, tiny_model_dir, pref_dir, tmp_path):
    """Checkpoints hold the LM (or adapter) + value_head.safetensors; resuming repeats the same steps."""
    out = tmp_path / "rm"
    kw = {"finetuning_type": method, "learning_rate": 1e-3, "max_steps": 4, "save_strategy": "steps"}
    _train(tiny_model_dir, pref_dir, out, "rm", save_steps=2, **kw)
    first = [r["loss"] for r in _logs(out)]
    assert (out / "checkpoint-2" / "value_head.safetensors").is_file()
    _train(
        tiny_model_dir,
        pref_dir,
        out,
        "rm",
        save_steps=2,
        resume_from_checkpoint=str(out / "checkpoint-2"),
        overwrite_output_dir=False,
        **kw,
    )
    resumed = [r["loss"] for r in _logs(out)][4:]
    assert resumed == pytest.approx(first[2:], abs=1e-6)


def test_dpo_lora_with_torch_compile_gives_the_eager_losses(tiny_model_dir, pref_dir, tmp_path):
    """The policy forward and the adapter-disabled reference forward run through the compiled layers."""
    losses = {}
    for run, compiled in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        _train(tiny_model_dir, pref_dir, tmp_path / run, "dpo", max_steps=3, torch_compile=compiled)
        losses[run] = [r["loss"] for r in _logs(tmp_path / run)]
    assert len(losses["compiled"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert all(abs(loss - math.log(2)) > 1e-4 for loss in losses["compiled"][1:])  # the policy moved


@pytest.mark.parametrize(
    "method", ["lora", "full"]
)  # the reference: the adapter-disabled policy, a frozen copy
def test_dpo_with_fused_layers_gives_the_plain_losses(method, tiny_model_dir, pref_dir, tmp_path):
    """fused_layers (on by default on a GPU) in a preference run: the policy's swapped layers, and the
    reference that shares them or is their deep copy, give the plain layers' losses."""
    losses = {}
    for run, fused in (("plain", False), ("fused", True)):
        torch.manual_seed(0)
        with tunesmith_messages() as messages:
            _train(tiny_model_dir, pref_dir, tmp_path / run, "dpo", max_steps=3, finetuning_type=method,
                   fused_layers=fused)  # fmt: skip
        losses[run] = [r["loss"] for r in _logs(tmp_path / run)]
        swapped = [m for m in messages if m.startswith("fused layers: 5 RMSNorm layers")]
        assert len(swapped) == int(fused) and (not fused or "2 attentions with one RoPE kernel" in swapped[0])
    assert len(losses["fused"]) == 3 and losses["fused"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses["fused"] == pytest.approx(losses["plain"], rel=1e-4)


def test_dpo_loads_its_models_without_padding_free(monkeypatch, tiny_model_dir, pref_dir, tmp_path):
    """DPO batches carry no document boundaries, so `flash_attn: auto` must not pick varlen for them."""
    from tunesmith.model import loader

    seen, original = [], loader.load_model
    monkeypatch.setattr(
        loader, "load_model", lambda *a, **kw: seen.append(kw.get("padding_free")) or original(*a, **kw)
    )
    _train(tiny_model_dir, pref_dir, tmp_path / "dpo", "dpo", max_steps=1, finetuning_type="lora")
    assert seen and not any(seen)
