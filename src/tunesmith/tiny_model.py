"""The tiny chat model: a 2-layer Qwen2 built from config with a fixed seed, saved with the tiny tokenizer.

Tests, the demo and benchmarks use it in place of a downloaded model; the same seed gives the same bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunesmith.tiny import tiny_tokenizer_dir

HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2


def build_tiny_model(out_dir: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Build the tiny Qwen2 chat model (fp32 safetensors + tokenizer + generation config) into out_dir.

    Example: `AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "tiny"))`.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(tokenizer_dir or tiny_tokenizer_dir())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=tokenizer.model_max_length,
        # Untied like Qwen2.5-7B: the head and the embeddings are separate modules to train and save.
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # A private RNG scope: building the model never shifts the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id], pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.save_pretrained(out)
    # Copied, not re-saved: save_pretrained would record load-time flags (local_files_only) in the files.
    for src in sorted(tokenizer_dir.iterdir()):
        if src.is_file() and src.name != "generation_config.json":
            shutil.copyfile(src, out / src.name)
    return out


if __name__ == "__main__":
    import sys

    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-model"))
