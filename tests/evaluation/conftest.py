"""Fixtures of the evaluation tests: the training tests' tiny model (built once per session), one torch thread."""

from __future__ import annotations

from tests.training import conftest as training

_one_torch_thread = training._one_torch_thread
tiny_model_dir = training.tiny_model_dir
