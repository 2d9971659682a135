"""`mt serve`'s page in a real browser: headless Chromium (Debian's chromium and chromium-driver)
driven by Selenium against a server on a free port, with the tiny trained run."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is missing (pip install -e '.[serve]')")
pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip(
        "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from test_serve import TIMEOUT_S, mt_translate

from mt.alignment import align
from mt.rundir import load_trained
from mt.serve.limits import Limits
from mt.serve.server import load, serving

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCREENSHOT = _script("serve_screenshot")  # its browser set-up is the test's
CPU = torch.device("cpu")
SENTENCE = "der Hund läuft schnell ."  # in the tiny corpus's vocabulary


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    driver = SCREENSHOT.chromium(1280, 1000)
    yield driver
    driver.quit()


@pytest.fixture
def url(trained_run: Path) -> Iterator[str]:
    served = load(trained_run, CPU, "fp32", None, Limits())
    with serving(served) as address:
        yield address


def texts(browser: WebDriver, selector: str) -> list[str]:
    """The text content of every element matching a CSS selector."""
    found = browser.find_elements(By.CSS_SELECTOR, selector)
    return [element.get_attribute("textContent") for element in found]


def answered(browser: WebDriver, source: str, beam: int, nbest: int) -> None:
    """Wait until the page shows the answer for this source text and these settings."""
    result = browser.find_element(By.ID, "translations")
    want = {"data-source": source, "data-beam": str(beam), "data-nbest": str(nbest)}
    WebDriverWait(browser, TIMEOUT_S).until(
        lambda _: all(result.get_attribute(key) == value for key, value in want.items())
    )


def set_number(browser: WebDriver, field: str, value: int) -> None:
    box = browser.find_element(By.ID, field)
    box.clear()
    box.send_keys(str(value))


@pytest.mark.slow
def test_the_page_translates_as_you_type_with_nbest_and_attention(
    browser: WebDriver, url: str, trained_run: Path
) -> None:
    browser.get(url)
    WebDriverWait(browser, TIMEOUT_S).until(
        lambda d: d.find_element(By.ID, "card").text.startswith("de → en")
    )
    assert not browser.find_element(By.ID, "lang-box").is_displayed()  # one target language
    browser.find_element(By.ID, "source").send_keys(SENTENCE)
    answered(browser, SENTENCE, beam=2, nbest=1)  # the run's beam
    assert texts(browser, "#translations li") == mt_translate(trained_run, [SENTENCE])
    assert len(texts(browser, "#nbest li")) == 1

    config, tokenizer, model, _ = load_trained(trained_run, CPU)
    found = align(model, tokenizer, SENTENCE, config.decode)  # what `mt attention` plots
    cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")
    assert len(cells) == len(found.source_pieces) * len(found.target_pieces)
    assert texts(browser, "#heatmap thead th")[1:] == found.source_pieces
    assert texts(browser, "#heatmap tbody th") == found.target_pieces

    set_number(browser, "beam", 3)
    set_number(browser, "nbest-k", 3)
    answered(browser, SENTENCE, beam=3, nbest=3)
    lines = mt_translate(trained_run, [SENTENCE], "--beam", "3", "--nbest", "3")
    rows = [line.split("\t") for line in lines]
    assert texts(browser, "#nbest li .text") == [row[2] for row in rows]
    assert texts(browser, "#nbest li .score") == [row[1] for row in rows]


@pytest.mark.slow
def test_the_page_translates_without_attention_over_the_servers_limit(
    browser: WebDriver, trained_run: Path
) -> None:
    served = load(trained_run, CPU, "fp32", None, Limits(max_attention_weights=1))
    with serving(served) as address:
        browser.get(address)
        browser.find_element(By.ID, "source").send_keys(SENTENCE)
        answered(browser, SENTENCE, beam=2, nbest=1)
    assert texts(browser, "#translations li") == mt_translate(trained_run, [SENTENCE])
    assert browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell") == []
    status = browser.find_element(By.ID, "status").text
    assert status.endswith(" ms (no attention: more weights than the server sends)"), status


@pytest.mark.slow
def test_the_screenshot_script(url: str, tmp_path: Path) -> None:
    output = tmp_path / "serve.png"
    SCREENSHOT.screenshot(url, SENTENCE, beam=3, nbest=2, output=output)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
