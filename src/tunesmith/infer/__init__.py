"""Inference: one engine interface (HF, vLLM) behind chat, the OpenAI-compatible API and predict."""
