"""The transformers backend: batched generation with left padding and KV cache, streaming, adapters.

A base model with one or more LoRA adapters is loaded and the adapters merged in its own dtype (one
adapter stays unmerged on a quantized base); a merged model loads as a plain model. The tokenizer
comes from the last adapter's folder when it holds one (tunesmith saves it there, with any new tokens
and the chat template), else from the base.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.stops import stop_token_ids
from tunesmith.data.types import Message
from tunesmith.errors import TunesmithError
from tunesmith.infer.engine import Completion, StopScan, StreamEvent
from tunesmith.infer.settings import SamplingSettings
from tunesmith.model.attention import sdpa_kernels

log = logging.getLogger("tunesmith")


@dataclass
class HFEngine:
    model: Any
    tokenizer: Any
    template: Any
    name: str
    stop_ids: list[int]
    description: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_config(cls, cfg: Any) -> HFEngine:
        from tunesmith.model.loader import load_model, load_tokenizer
        from tunesmith.training.setup import require_model, template_for

        base = require_model(cfg)
        adapters = tuple(cfg.model.adapter_name_or_path)
        tok_src = (
            adapters[-1] if adapters and (Path(adapters[-1]) / "tokenizer_config.json").exists() else base
        )
        tokenizer = load_tokenizer(tok_src, trust_remote_code=cfg.model.trust_remote_code)
        tokenizer.padding_side = "left"
        template = template_for(cfg, tokenizer)
        dtype = cfg.infer.infer_dtype if cfg.infer.infer_dtype != "auto" else cfg.model.dtype
        loaded = load_model(
            base,
            dtype=dtype,
            attn=cfg.model.flash_attn,
            gradient_checkpointing=False,
            trust_remote_code=cfg.model.trust_remote_code,
            quantization_bit=cfg.model.quantization_bit,
            tokenizer=tokenizer,
        )
        model = _with_adapters(loaded.model, adapters, quantized=cfg.model.quantization_bit is not None)
        if cfg.model.quantization_bit is None:
            model.to("cuda" if torch.cuda.is_available() else "cpu")
        model.eval()
        name = Path(adapters[-1]).name if adapters else Path(base).name or base
        return cls.build(model, tokenizer, template, name=name, base=base, adapters=adapters)

    @classmethod
    def build(cls, model: Any, tokenizer: Any, template: Any, *, name: str, **describe: Any) -> HFEngine:
        """An engine around an already loaded model (tests, PPO/GRPO policies)."""
        from transformers import GenerationConfig

        stop_ids = stop_token_ids(tokenizer, template)
        if not stop_ids:
            raise TunesmithError(
                "the template's stop words and the tokenizer's EOS are not single tokens: generation could "
                "never stop. Fix: pick the model's template (template: auto) or set eos on the tokenizer"
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        shipped = {
            k: v
            for k, v in (model.generation_config.to_diff_dict() if model.generation_config else {}).items()
            if k not in ("transformers_version", "eos_token_id", "pad_token_id", "bos_token_id")
        }
        # The model's own generation defaults must never fill in a setting the user did not choose.
        model.generation_config = GenerationConfig(
            eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
        )
        device = next(model.parameters()).device
        description = {
            "backend": "huggingface",
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "stop_ids": stop_ids,
            "ignored_model_generation_defaults": shipped,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in describe.items()},
        }
        return cls(model, tokenizer, template, name, stop_ids, description)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(self, messages: Sequence[Message], tools: str = "") -> list[int]:
        rendered = self.template.render(list(messages), tools=tools, add_generation_prompt=True)
        return self.tokenizer.backend_tokenizer.encode(rendered.text, add_special_tokens=False).ids

    def generate(self, prompts: Sequence[list[int]], settings: SamplingSettings) -> list[list[Completion]]:
        if not prompts:
            return []
        expanded = [list(p) for p in prompts for _ in range(settings.n)]
        ids, mask = self._left_pad(expanded)
        config = self._config(settings)
        with self._lock, torch.inference_mode(), sdpa_kernels():
            self._seed(settings)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, **self._stop_kwargs(settings)
            )
        generated = out[:, ids.shape[1] :].tolist()
        done = [self._completion(g, len(p), settings) for g, p in zip(generated, expanded)]
        return [done[i * settings.n : (i + 1) * settings.n] for i in range(len(prompts))]

    def stream(self, prompt: list[int], settings: SamplingSettings) -> Iterator[StreamEvent]:
        from transformers import TextIteratorStreamer

        if settings.n != 1 or settings.num_beams != 1:
            raise TunesmithError("streaming gives one sampled or greedy answer: use n=1 and num_beams=1")
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=settings.skip_special_tokens
        )
        ids, mask = self._left_pad([list(prompt)])
        config = self._config(settings)
        holder: dict[str, Any] = {}
        cancel = threading.Event()

        def work() -> None:
            from transformers import StoppingCriteriaList

            try:
                with torch.inference_mode(), sdpa_kernels():
                    self._seed(settings)
                    holder["out"] = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=config,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                        **self._stop_kwargs(settings),
                    )
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread below
                holder["error"] = e
                streamer.end()

        with self._lock:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            drained = False
            try:
                yield from self._stream_text(streamer, settings)
                drained = True
            finally:
                # A consumer that stops early (client gone) cancels the generation; the model stays
                # locked until that thread has really finished, so no two generations ever overlap.
                cancel.set()
                if not drained:
                    for _ in streamer:  # ends at the streamer's stop signal (generate ends it)
                        pass
                thread.join()
        if "error" in holder:
            raise holder["error"]
        generated = holder["out"][0, ids.shape[1] :].tolist()
        yield StreamEvent("", self._completion(generated, len(prompt), settings))

    # ---- helpers -------------------------------------------------------------------------------

    def _stream_text(self, streamer: Any, settings: SamplingSettings) -> Iterator[StreamEvent]:
        """Text pieces, holding back a tail that could be the start of a stop string."""
        hold = max((len(s) for s in settings.stop), default=1) - 1
        scan = StopScan(frozenset(), settings.stop)
        text, sent = "", 0
        for piece in streamer:
            if sent < 0:
                continue  # a stop string ended the answer; drain the streamer
            text += piece
            cut, stopped = scan.cut_text(text)
            if stopped:
                if len(cut) > sent:
                    yield StreamEvent(cut[sent:])
                sent = -1
                continue
            ready = len(text) - hold
            if ready > sent:
                yield StreamEvent(text[sent:ready])
                sent = ready
        if sent >= 0 and len(text) > sent:
            yield StreamEvent(text[sent:])

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[i, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _config(self, settings: SamplingSettings) -> Any:
        config = settings.hf_generation_config(
            self.stop_ids, self.tokenizer.pad_token_id, self.tokenizer.bos_token_id
        )
        if settings.stop:
            config.stop_strings = list(settings.stop)
        return config

    def _stop_kwargs(self, settings: SamplingSettings) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer} if settings.stop else {}

    @staticmethod
    def _seed(settings: SamplingSettings) -> None:
        if settings.seed is not None and not settings.greedy:
            torch.manual_seed(settings.seed)

    def _completion(self, generated: list[int], prompt_len: int, settings: SamplingSettings) -> Completion:
        scan = StopScan(frozenset(self.stop_ids), settings.stop)
        ids, stopped = scan.cut_ids(generated)
        body = ids[:-1] if stopped else ids
        if not stopped:  # no stop token: drop padding after a stop string ended the sequence early
            pad = self.tokenizer.pad_token_id
            while body and body[-1] == pad and len(body) < len(generated):
                body = body[:-1]
            ids = body
        text = self.tokenizer.decode(body, skip_special_tokens=settings.skip_special_tokens)
        text, by_string = scan.cut_text(text)
        stopped = stopped or by_string
        finish = "stop" if stopped else ("length" if len(ids) >= settings.max_new_tokens else "stop")
        return Completion(text, ids, finish, prompt_len, len(ids))


class _Cancelled:
    """A stopping criterion that ends generation once ``event`` is set (a streaming client went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def _with_adapters(model: Any, adapters: tuple[str, ...], *, quantized: bool) -> Any:
    """Load LoRA adapters; merge them (in the base's dtype) unless the base is quantized."""
    if not adapters:
        return model
    from peft import PeftModel

    if quantized and len(adapters) > 1:
        raise TunesmithError(
            "a quantized model can serve one adapter (merging needs full weights). Fix: merge the adapters "
            "into the base first (tunesmith export) or drop quantization_bit"
        )
    for path in adapters:
        if not (Path(path) / "adapter_config.json").exists():
            raise TunesmithError(
                f"adapter_name_or_path: {path!r} has no adapter_config.json; give the folder a LoRA run "
                "wrote (its output_dir or a checkpoint-N inside it)"
            )
        model = PeftModel.from_pretrained(model, path)
        if not quantized:
            model = model.merge_and_unload()
    log.info("loaded adapter(s): %s%s", ", ".join(adapters), "" if quantized else " (merged)")
    return model


__all__ = ["HFEngine"]
