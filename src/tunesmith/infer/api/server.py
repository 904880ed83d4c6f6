"""``tunesmith api CONFIG``: load the engine from the config and serve it with uvicorn."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from tunesmith.infer.settings import SamplingSettings

DEFAULT_MAX_BATCH = 32  # sequences per generate call unless per_device_eval_batch_size says otherwise


def server_settings(cfg: Any) -> SamplingSettings:
    """The config's generation settings, without the training seed.

    A seed would make every unseeded request draw the same random numbers; a client that wants
    repeatable sampling sends ``seed`` with its request.
    """
    return replace(SamplingSettings.from_config(cfg), seed=None)


def max_batch(cfg: Any) -> int:
    """per_device_eval_batch_size when the config sets it, else DEFAULT_MAX_BATCH."""
    return int(cfg.training.hf.get("per_device_eval_batch_size", DEFAULT_MAX_BATCH))


def prepare(cfg: Any) -> tuple[Any, str, int]:
    """(app, host, port) of the config: the engine loaded, its description and settings printed."""
    from tunesmith.infer.api.app import create_app
    from tunesmith.infer.engine import load_engine

    engine = load_engine(cfg)
    settings = server_settings(cfg)
    infer = cfg.infer
    batch = max_batch(cfg)
    print(f"tunesmith api: engine {json.dumps(engine.description, default=str)}", flush=True)
    print(f"tunesmith api: generation defaults: {settings.describe()}", flush=True)
    print(
        f"tunesmith api: serving {engine.name!r} at http://{infer.api_host}:{infer.api_port}/v1 "
        f"(batches of up to {batch}; auth {'on' if infer.api_key else 'off'})",
        flush=True,
    )
    return create_app(engine, settings, infer.api_key, max_batch=batch), infer.api_host, infer.api_port


def serve(cfg: Any) -> None:
    """Load the model the config names and serve it until interrupted (api_host, api_port, api_key)."""
    import uvicorn

    app, host, port = prepare(cfg)
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["DEFAULT_MAX_BATCH", "max_batch", "prepare", "serve", "server_settings"]
