"""Generation settings without surprises: the config's values, a request's overrides, nothing else.

The model's own ``generation_config.json`` (Qwen ships ``do_sample: true, temperature: 0.7,
repetition_penalty: 1.05``) never fills in a value behind the user's back: the engine hands ``generate``
a complete configuration built here, so ``do_sample: false`` is greedy whatever the model ships. The
effective settings are printed and written next to every output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class SamplingSettings:
    """One generation request's settings (config defaults, then per-request overrides)."""

    do_sample: bool = True
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    repetition_penalty: float = 1.0
    max_new_tokens: int = 1024
    num_beams: int = 1
    length_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # extra stop strings (the template's stop tokens always apply)
    n: int = 1  # completions per prompt
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1, got {self.num_beams}")
        if self.n > 1 and self.greedy and self.num_beams == 1:
            problems.append("n > 1 with greedy decoding gives n identical answers; set do_sample: true")
        if problems:
            raise TunesmithError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        """Greedy (or beam) search: do_sample off, or temperature 0 (the OpenAI API's way to ask for it)."""
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_config(cls, cfg: Any) -> SamplingSettings:
        """The generation keys of a tunesmith Config (seed: the config's seed)."""
        g = cfg.generation
        return cls(
            do_sample=g.do_sample,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            repetition_penalty=g.repetition_penalty,
            max_new_tokens=g.max_new_tokens,
            num_beams=g.num_beams,
            length_penalty=g.length_penalty,
            seed=cfg.training.seed,
            stop=tuple(getattr(g, "stop", ()) or ()),
            skip_special_tokens=g.skip_special_tokens,
        )

    def with_overrides(self, **overrides: Any) -> SamplingSettings:
        """These settings with the given (non-None) values replaced; unknown keys are an error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TunesmithError(f"unknown generation setting(s): {', '.join(unknown)}")
        values = {k: v for k, v in overrides.items() if v is not None}
        if "stop" in values:
            stop = values["stop"]
            values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        if values.get("temperature") == 0:
            values["do_sample"] = False  # temperature 0 is a request for greedy decoding
        return replace(self, **values)

    def effective(self) -> dict[str, Any]:
        """The settings that act, as recorded with outputs (sampling knobs only when sampling)."""
        out: dict[str, Any] = {"do_sample": not self.greedy, "max_new_tokens": self.max_new_tokens}
        if not self.greedy:
            out |= {
                "temperature": self.temperature,
                "top_p": self.top_p,
                "top_k": self.top_k,
                "seed": self.seed,
            }
        if self.num_beams > 1:
            out |= {"num_beams": self.num_beams, "length_penalty": self.length_penalty}
        out |= {"repetition_penalty": self.repetition_penalty, "stop": list(self.stop), "n": self.n}
        return out

    def describe(self) -> str:
        """One line for the log: 'greedy, max_new_tokens=256, ...'."""
        eff = self.effective()
        head = "sampling" if eff.pop("do_sample") else "greedy"
        return head + ", " + ", ".join(f"{k}={v}" for k, v in eff.items())

    def hf_generation_config(self, stop_ids: list[int], pad_id: int | None, bos_id: int | None = None) -> Any:
        """The transformers GenerationConfig of these settings (the engine blanks the model's own defaults)."""
        from transformers import GenerationConfig

        sampling = not self.greedy
        knobs: dict[str, Any] = {"do_sample": sampling}
        if sampling:  # top_k 0 switches top-k filtering off (None would mean transformers' default of 50)
            knobs |= {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return GenerationConfig(
            **knobs,
            repetition_penalty=self.repetition_penalty,
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=1,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            bos_token_id=bos_id,
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


__all__ = ["SamplingSettings"]
