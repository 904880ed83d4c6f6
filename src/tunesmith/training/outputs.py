"""What a finished run leaves in output_dir besides weights: the tokenizer with the chat template
written into it, and a generation_config.json whose EOS ids are the template's stop tokens, so the
model stops in any tool that loads the folder (transformers, vLLM, llama.cpp converters, Ollama)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunesmith.data.stops import stop_token_ids
from tunesmith.data.template_jinja import chat_template_for

log = logging.getLogger("tunesmith")


def save_tokenizer_and_generation_config(
    out_dir: str | Path, tokenizer: Any, template: Any, model: Any
) -> list[int]:
    """Write the tokenizer (with our chat template) and a generation_config carrying every stop id."""
    out = Path(out_dir)
    tokenizer.chat_template = chat_template_for(template, tokenizer)
    tokenizer.save_pretrained(out)
    stops = stop_token_ids(tokenizer, template)
    gen = model.generation_config
    gen.eos_token_id = stops if len(stops) > 1 else (stops[0] if stops else gen.eos_token_id)
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(out)
    log.info("stop tokens written to generation_config.json: %s", [tokenizer.decode([i]) for i in stops])
    return stops
