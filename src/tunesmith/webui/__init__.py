"""Tunesmith web UI (Gradio, the optional extra ``webui``): `tunesmith webui` calls :func:`launch`.

Every action writes a config and runs the same CLI in a subprocess (webui/jobs.py), so the UI can do
nothing the command line cannot. Gradio is imported only by webui/app.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunesmith.webui.app import Server

__all__ = ["launch"]


def launch(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    password: str | None = None,
    lang: str = "en",
    *,
    block: bool = True,
) -> Server:
    """Serve the UI over the runs under ``root`` on http://host:port (default: this machine only).

    With ``password`` the browser asks for a login: any user name (e.g. "tunesmith") and this password.
    ``block=False`` returns once the server listens (tests, notebooks); ``.close()`` on the result stops
    the server and every job it started. With ``block=True`` (the CLI) it serves until Ctrl-C and then
    stops its jobs, so no training or chat server outlives the UI.
    """
    from tunesmith.webui.app import serve

    folder = Path(root).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return serve(folder, host, port, password, lang, block)
