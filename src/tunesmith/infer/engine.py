"""One engine interface for chat, the API server, predict and (later) PPO/GRPO generation.

``load_engine(cfg)`` picks the backend from ``infer_backend`` (huggingface | vllm). Both render
prompts with the run's chat template, stop on the template's stop tokens, and return ``Completion``s
with the finish reason and token counts; generation settings come only from ``SamplingSettings``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tunesmith.data.types import Message
from tunesmith.infer.settings import SamplingSettings


@dataclass
class Completion:
    """One generated answer."""

    text: str
    token_ids: list[int]  # generated ids, the stop token included when one ended the answer
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StreamEvent:
    """A piece of streamed text; the last event carries the finished Completion."""

    text: str
    completion: Completion | None = None


class Engine(Protocol):
    """What every backend offers (see hf_engine.HFEngine)."""

    name: str  # the model name served (e.g. in /v1/models)
    tokenizer: Any
    template: Any
    stop_ids: list[int]
    description: dict[str, Any]  # what was loaded (base, adapters, dtype, device, backend)

    def prompt_ids(self, messages: Sequence[Message], tools: str = "") -> list[int]:
        """The token ids of a conversation rendered with the generation prompt."""
        ...

    def generate(self, prompts: Sequence[list[int]], settings: SamplingSettings) -> list[list[Completion]]:
        """settings.n completions for each prompt (token ids), in order."""
        ...

    def stream(self, prompt: list[int], settings: SamplingSettings) -> Iterator[StreamEvent]:
        """One completion, as text pieces while it is generated."""
        ...


@dataclass
class StopScan:
    """Where an answer ends: the first stop token, else the first stop string in its text."""

    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    hits: list[int] = field(default_factory=list)

    def cut_ids(self, ids: list[int]) -> tuple[list[int], bool]:
        """ids up to and including the first stop token, and whether one was found."""
        for i, t in enumerate(ids):
            if t in self.stop_ids:
                return ids[: i + 1], True
        return ids, False

    def cut_text(self, text: str) -> tuple[str, bool]:
        """text before the first stop string, and whether one was found."""
        best = -1
        for s in self.stop_strings:
            at = text.find(s)
            if at >= 0 and (best < 0 or at < best):
                best = at
        return (text, False) if best < 0 else (text[:best], True)


def load_engine(cfg: Any) -> Engine:
    """The backend named by ``infer_backend``, loaded with the config's model, adapters and template."""
    if cfg.infer.infer_backend == "vllm":
        from tunesmith.infer.vllm_engine import VLLMEngine

        return VLLMEngine.from_config(cfg)
    from tunesmith.infer.hf_engine import HFEngine

    return HFEngine.from_config(cfg)


__all__ = ["Completion", "Engine", "StopScan", "StreamEvent", "load_engine"]
