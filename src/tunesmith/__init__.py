"""tunesmith: one YAML from a user's data and an open LLM to a fine-tuned, evaluated, served expert."""

__version__ = "0.1.0"
