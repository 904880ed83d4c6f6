"""The acceptance test of the web UI: a real browser trains the tiny model, chats with it, lists the run.

Headless chromium (selenium) drives the served app: fill the Train tab, start, watch the loss curve and
the finished status, predict on the Evaluate tab, load the run on the Chat tab and get a streamed
answer, see the run completed on the Runs tab. Screenshots of every tab go to SHOTS (below).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

# Screenshots go to a temporary folder, so a test run leaves the tree clean; refresh docs/webui/ with
# TUNESMITH_WEBUI_SHOTS=docs/webui .venv/bin/python -m pytest tests/webui/test_browser.py
SHOTS = Path(os.environ.get("TUNESMITH_WEBUI_SHOTS") or tempfile.mkdtemp(prefix="tunesmith-webui-shots-"))


def wait(
    driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 30, what: str = ""
) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message=what)


def element(driver: WebDriver, css: str, timeout: float = 30) -> WebElement:
    """The first displayed element matching ``css``."""

    def found(d: WebDriver) -> WebElement | bool:
        return next((e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()), False)

    return wait(driver, found, timeout, f"no visible element {css!r}")


def text_of(driver: WebDriver, elem_id: str) -> str:
    return "".join(e.text for e in driver.find_elements(By.ID, elem_id))


def wait_text(driver: WebDriver, elem_id: str, text: str, timeout: float) -> None:
    wait(driver, lambda d: text in text_of(d, elem_id), timeout, f"#{elem_id} never showed {text!r}")


def type_into(driver: WebDriver, elem_id: str, text: str) -> None:
    """Replace the value of the text or number box ``elem_id``."""
    box = element(driver, f"#{elem_id} input, #{elem_id} textarea")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)


def pick(driver: WebDriver, elem_id: str, option: str) -> None:
    """Choose ``option`` in the dropdown ``elem_id``; a single-choice one closes its list."""
    element(driver, f"#{elem_id} input").click()
    element(driver, f'#{elem_id} li[role="option"][aria-label="{option}"]').click()
    options = f'#{elem_id} li[role="option"]'
    if not driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} .token"):  # not a multiselect
        wait(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, options), 10, f"#{elem_id} stayed open")


def click(driver: WebDriver, css: str) -> None:
    element(driver, css).click()


def open_tab(driver: WebDriver, name: str) -> None:
    click(driver, f"#tab-{name}-button")


def open_group(driver: WebDriver, group: str) -> None:
    click(driver, f"#train-group-{group} > button")


def shot(driver: WebDriver, name: str, center: str, started: float) -> None:
    """Save SHOTS/<name>.png with element ``center`` in the middle of the window."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element(driver, center))
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    print(f"{time.monotonic() - started:.1f} s: {name}")  # where the time went, shown when the test fails


def plotted(driver: WebDriver, elem_id: str) -> bool:
    """Whether the plot ``elem_id`` draws data (vega marks), not its empty placeholder."""
    plot = driver.find_elements(By.ID, elem_id)
    return bool(plot) and bool(plot[0].find_elements(By.CSS_SELECTOR, "canvas, svg .mark-line path"))


def test_train_chat_runs_in_a_browser(
    served: Any, browser: WebDriver, tiny_model: Path, sft_file: Path
) -> None:
    d = browser
    started = time.monotonic()
    d.get(served.url)

    # Train: the model's template is guessed from its tokenizer when the model box loses focus.
    type_into(d, "train-model", str(tiny_model))
    type_into(d, "train-dataset", str(sft_file))
    wait(d, lambda d: element(d, "#train-template input").get_attribute("value") not in ("", "auto"), 60,
         "the template was not guessed")  # fmt: skip
    open_group(d, "data")
    type_into(d, "train-field-cutoff_len", "64")
    open_group(d, "training")
    for key, value in {"max_steps": "12", "logging_steps": "1", "learning_rate": "0.01",
                       "per_device_train_batch_size": "4"}.items():  # fmt: skip
        type_into(d, f"train-field-{key}", value)
    click(d, "#train-start")
    wait_text(d, "train-status", "running", 20)
    wait(d, lambda d: plotted(d, "train-curves"), 90, "no loss curve was drawn")
    wait(d, lambda d: re.search(r"step ([3-9]|1[0-2]) / 12", text_of(d, "train-progress")), 60, "no progress")
    shot(d, "train-running", "#train-curves", started)
    wait_text(d, "train-status", "finished (exit 0)", 90)
    wait(d, lambda d: "step 12 / 12" in text_of(d, "train-progress"), 10, "progress did not reach 12/12")
    shot(d, "train", "#train-progress", started)
    run_name = served.ui.run_names()[0]

    # Evaluate & Predict: start predicting with the run (it runs while the chat server starts).
    open_tab(d, "evaluate")
    pick(d, "evaluate-run", run_name)
    type_into(d, "evaluate-dataset", str(sft_file))
    type_into(d, "evaluate-max-samples", "4")
    type_into(d, "evaluate-max-new-tokens", "8")
    click(d, "#evaluate-start")
    wait_text(d, "evaluate-status", "running", 20)

    # Chat: load the trained run in `tunesmith api`, stream an answer.
    open_tab(d, "chat")
    pick(d, "chat-run", run_name)
    wait(d, lambda d: element(d, "#chat-model input, #chat-model textarea").get_attribute("value"), 20)
    click(d, "#chat-load")
    wait_text(d, "chat-status", "Serving on", 90)
    type_into(d, "chat-message", "Hello")
    click(d, "#chat-send")
    bot = '#chat-chatbot [data-testid="bot"]'
    wait(d, lambda d: any(e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, bot)), 60, "no answer")
    shot(d, "chat", "#chat-chatbot", started)
    click(d, "#chat-unload")
    wait_text(d, "chat-status", "No model loaded", 30)

    # Evaluate & Predict: the predictions next to the references.
    open_tab(d, "evaluate")
    wait_text(d, "evaluate-status", "finished (exit 0)", 60)
    wait(d, lambda d: "capital" in text_of(d, "evaluate-predictions"), 20, "no predictions shown")
    shot(d, "evaluate", "#evaluate-predictions", started)

    open_tab(d, "export")
    pick(d, "export-run", run_name)
    shot(d, "export", "#export-start", started)

    # Runs: the run is listed as completed; choosing it draws its curves.
    open_tab(d, "runs")
    wait_text(d, "runs-table", "completed", 20)
    pick(d, "runs-select", run_name)
    click(d, "#app-title")  # away from the dropdown, which closes its option list
    wait(d, lambda d: plotted(d, "runs-curves"), 20, "the run's curves were not drawn")
    shot(d, "runs", "#runs-select", started)
