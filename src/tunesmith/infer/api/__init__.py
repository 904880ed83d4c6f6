"""The OpenAI-compatible API server (needs the ``api`` extra: pip install 'tunesmith[api]').

    from tunesmith.infer.api import serve
    serve(tunesmith.load_config("serve.yaml"))   # what `tunesmith api serve.yaml` runs

Modules: protocol (request/response models), convert (request -> engine inputs), tool_calls,
batcher (the worker that owns the model), responses (JSON and SSE), errors, app (create_app), server.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

from tunesmith.errors import TunesmithError

_EXTRA = ("fastapi", "uvicorn", "pydantic")


def serve(cfg: Any) -> None:
    """Serve the config's model over HTTP until interrupted (see server.serve)."""
    missing = [name for name in _EXTRA if find_spec(name) is None]
    if missing:
        raise TunesmithError(
            f"tunesmith api needs {', '.join(missing)} (the api extra): pip install 'tunesmith[api]'"
        )
    from tunesmith.infer.api.server import serve as run_server

    run_server(cfg)


__all__ = ["serve"]
