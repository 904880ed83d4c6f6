"""The vLLM backend (optional extra `vllm`, GPU only): same interface as the HF engine.

Prompts are rendered by tunesmith's template and passed to vLLM as token ids, so both backends see
the same tokens; the template's stop tokens are vLLM's ``stop_token_ids``. A LoRA adapter is served
with vLLM's LoRA support (one adapter; merge several with `tunesmith export` first). vLLM's offline
engine does not stream: ``stream`` yields the whole answer as one piece.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.stops import stop_token_ids
from tunesmith.data.types import Message
from tunesmith.errors import TunesmithError
from tunesmith.infer.engine import Completion, StreamEvent
from tunesmith.infer.settings import SamplingSettings

INSTALL = "infer_backend: vllm needs vLLM on a CUDA machine: pip install 'tunesmith[vllm]'"


@dataclass
class VLLMEngine:
    llm: Any
    tokenizer: Any
    template: Any
    name: str
    stop_ids: list[int]
    lora: Any = None  # vllm.lora.request.LoRARequest
    description: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Any) -> VLLMEngine:
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise TunesmithError(f"{INSTALL} ({e})") from None
        from tunesmith.model.loader import load_tokenizer
        from tunesmith.training.setup import require_model, template_for

        base = require_model(cfg)
        adapters = tuple(cfg.model.adapter_name_or_path)
        if len(adapters) > 1:
            raise TunesmithError(
                "infer_backend: vllm serves one LoRA adapter; merge the others into the base first "
                "(tunesmith export) or use infer_backend: huggingface"
            )
        tok_src = adapters[0] if adapters and (Path(adapters[0]) / "tokenizer_config.json").exists() else base
        tokenizer = load_tokenizer(tok_src, trust_remote_code=cfg.model.trust_remote_code)
        template = template_for(cfg, tokenizer)
        dtype = cfg.infer.infer_dtype if cfg.infer.infer_dtype != "auto" else "auto"
        llm = vllm.LLM(
            model=base,
            tokenizer=str(tok_src),
            dtype=dtype,
            max_model_len=cfg.infer.vllm_maxlen,
            gpu_memory_utilization=cfg.infer.vllm_gpu_util,
            enforce_eager=cfg.infer.vllm_enforce_eager,
            trust_remote_code=cfg.model.trust_remote_code,
            enable_lora=bool(adapters),
            max_lora_rank=cfg.infer.vllm_max_lora_rank,
        )
        lora = LoRARequest("adapter", 1, adapters[0]) if adapters else None
        stop_ids = stop_token_ids(tokenizer, template)
        name = Path(adapters[-1]).name if adapters else Path(base).name or base
        description = {"backend": "vllm", "base": base, "adapters": list(adapters), "stop_ids": stop_ids}
        return cls(llm, tokenizer, template, name, stop_ids, lora, description)

    def prompt_ids(self, messages: Sequence[Message], tools: str = "") -> list[int]:
        rendered = self.template.render(list(messages), tools=tools, add_generation_prompt=True)
        return self.tokenizer.backend_tokenizer.encode(rendered.text, add_special_tokens=False).ids

    def sampling_params(self, settings: SamplingSettings) -> Any:
        """vLLM SamplingParams equal to the settings (greedy: temperature 0, no sampling knobs)."""
        from vllm import SamplingParams

        if settings.num_beams > 1:
            raise TunesmithError("beam search (num_beams > 1) needs infer_backend: huggingface")
        sampling = not settings.greedy
        return SamplingParams(
            n=settings.n,
            temperature=settings.temperature if sampling else 0.0,
            top_p=settings.top_p if sampling else 1.0,
            top_k=settings.top_k if sampling and settings.top_k else -1,
            repetition_penalty=settings.repetition_penalty,
            max_tokens=settings.max_new_tokens,
            seed=settings.seed if sampling else None,
            stop=list(settings.stop) or None,
            stop_token_ids=list(self.stop_ids),
            skip_special_tokens=settings.skip_special_tokens,
        )

    def generate(self, prompts: Sequence[list[int]], settings: SamplingSettings) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            self.sampling_params(settings),
            lora_request=self.lora,
            use_tqdm=False,
        )
        result = []
        for prompt, out in zip(prompts, outputs):
            result.append(
                [
                    Completion(
                        text=o.text,
                        token_ids=list(o.token_ids),
                        finish_reason="length" if o.finish_reason == "length" else "stop",
                        prompt_tokens=len(prompt),
                        completion_tokens=len(o.token_ids),
                    )
                    for o in out.outputs
                ]
            )
        return result

    def stream(self, prompt: list[int], settings: SamplingSettings) -> Iterator[StreamEvent]:
        completion = self.generate([prompt], settings)[0][0]
        yield StreamEvent(completion.text)
        yield StreamEvent("", completion)


__all__ = ["VLLMEngine"]
