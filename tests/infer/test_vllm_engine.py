"""The vLLM backend's mapping onto vLLM's API, against a stand-in `vllm` package (vLLM needs CUDA).

What this proves: our prompts reach vLLM as the same token ids the HF engine uses, settings become the
equivalent SamplingParams (greedy = temperature 0, the template's stop tokens as stop_token_ids), one
adapter becomes a LoRARequest, and results map back to Completions. It cannot prove vLLM itself runs.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.infer.engine import load_engine
from tunesmith.infer.settings import SamplingSettings

FAKE = {
    "vllm/__init__.py": """
        from types import SimpleNamespace
        CALLS = []
        class SamplingParams:
            def __init__(self, **kw):
                self.__dict__.update(kw)
        class LLM:
            def __init__(self, **kw):
                CALLS.append(("init", kw))
            def generate(self, prompts, params, lora_request=None, use_tqdm=True):
                CALLS.append(("generate", prompts, params, lora_request))
                out = []
                for p in prompts:
                    outs = [SimpleNamespace(text=f"answer {i}", token_ids=[5, 6, 7][: 1 + i],
                                            finish_reason="length" if i else "stop") for i in range(params.n)]
                    out.append(SimpleNamespace(outputs=outs))
                return out
    """,
    "vllm/inputs.py": """
        class TokensPrompt(dict):
            def __init__(self, prompt_token_ids):
                super().__init__(prompt_token_ids=prompt_token_ids)
    """,
    "vllm/lora/__init__.py": "",
    "vllm/lora/request.py": """
        class LoRARequest:
            def __init__(self, name, id, path):
                self.name, self.id, self.path = name, id, path
    """,
}


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch):
    for rel, body in FAKE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm

    yield vllm
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        sys.modules.pop(name, None)


def _cfg(model: Path, **over):
    keys = {"model_name_or_path": str(model), "template": "qwen", "infer_backend": "vllm", **over}
    return tunesmith.load_config(None, [f"{k}={v}" for k, v in keys.items()])


def test_settings_prompts_and_results_map_onto_vllm(
    fake_vllm, trained_lora: Path, tiny_model_dir: Path
) -> None:
    engine = load_engine(_cfg(tiny_model_dir, adapter_name_or_path=str(trained_lora), vllm_maxlen=512))
    init = fake_vllm.CALLS[0][1]
    assert init["model"] == str(tiny_model_dir) and init["enable_lora"] and init["max_model_len"] == 512
    assert engine.lora.path == str(trained_lora)
    hf = load_engine(
        _cfg(tiny_model_dir, infer_backend="huggingface", adapter_name_or_path=str(trained_lora))
    )
    messages = [{"role": "user", "content": "Name the capital city number 1."}]
    ids = engine.prompt_ids(messages)
    assert ids == hf.prompt_ids(messages)

    greedy = engine.generate([ids], SamplingSettings(do_sample=False, max_new_tokens=9))
    _, prompts, params, lora = fake_vllm.CALLS[-1]
    assert prompts[0]["prompt_token_ids"] == ids and lora is engine.lora
    assert params.temperature == 0.0 and params.top_k == -1 and params.max_tokens == 9
    assert params.stop_token_ids == hf.stop_ids and params.seed is None
    assert greedy[0][0].text == "answer 0" and greedy[0][0].finish_reason == "stop"

    sampled = engine.generate(
        [ids, ids], SamplingSettings(temperature=0.5, top_k=0, seed=3, n=2, stop=("X",))
    )
    params = fake_vllm.CALLS[-1][2]
    assert params.temperature == 0.5 and params.top_k == -1 and params.seed == 3 and params.stop == ["X"]
    assert [c.finish_reason for c in sampled[1]] == ["stop", "length"]
    assert sampled[1][1].completion_tokens == 2 and sampled[1][1].prompt_tokens == len(ids)
    events = list(engine.stream(ids, SamplingSettings(do_sample=False)))
    assert events[0].text == "answer 0" and events[-1].completion.text == "answer 0"


def test_vllm_refuses_what_it_cannot_do(fake_vllm, tiny_model_dir: Path, trained_lora: Path) -> None:
    with pytest.raises(TunesmithError, match="one LoRA adapter"):
        load_engine(_cfg(tiny_model_dir, adapter_name_or_path=f"{trained_lora},{trained_lora}"))
    engine = load_engine(_cfg(tiny_model_dir))
    with pytest.raises(TunesmithError, match="beam search"):
        engine.generate([[1, 2]], SamplingSettings(do_sample=False, num_beams=2))


def test_missing_vllm_says_how_to_install(tiny_model_dir: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(TunesmithError, match=r"tunesmith\[vllm\]"):
        load_engine(_cfg(tiny_model_dir))
