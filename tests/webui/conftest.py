"""Fixtures of the web UI tests: the tiny model, a small sft file, the UI served on a free port, a browser."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.training.helpers import write_sft_data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tunesmith.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("webui-tiny") / "model")


@pytest.fixture
def sft_file(tmp_path: Path) -> Path:
    return write_sft_data(tmp_path / "sft.json")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Any]:
    """The UI over tmp_path/root on a free port; closing it stops every job it started."""
    from tunesmith.webui import launch
    from tunesmith.webui.session import free_port

    server = launch(tmp_path / "root", port=free_port(), block=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless chromium at 1400x1000 (skips when chromium or chromedriver is not installed)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
