"""A screenshot of `mt serve`'s page for the README: a run served, a sentence typed, its n-best
list and cross-attention drawn, in headless Chromium (Debian's chromium and chromium-driver).

    .venv/bin/python scripts/serve_screenshot.py runs/multi30k-de-en  # docs/figures/serve.png
    .venv/bin/python scripts/serve_screenshot.py RUN --sentence "..." --output page.png

The server runs in this process on 127.0.0.1 and a free port; nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from mt.serve.limits import Limits
from mt.serve.server import load, serving
from mt.translate import resolve_runtime

# Line 1 of the Multi30k 2016 Flickr test set, as in scripts/figures.sh.
SENTENCE = "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."
TIMEOUT_S = 120


def chromium(width: int, height: int) -> webdriver.Chrome:
    """Headless Chromium driven by the system's chromedriver."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def screenshot(url: str, sentence: str, beam: int, nbest: int, output: Path) -> None:
    """Type the sentence, set beam and n-best, wait for the answer, save the page as PNG."""
    browser = chromium(1280, 1000)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, TIMEOUT_S)
        wait.until(lambda d: d.find_element(By.ID, "beam").get_attribute("value"))
        for field, value in (("beam", beam), ("nbest-k", nbest)):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(str(value))
        browser.find_element(By.ID, "source").send_keys(sentence)
        result = browser.find_element(By.ID, "translations")
        wait.until(lambda _: result.get_attribute("data-source") == sentence)
        output.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(output))
    finally:
        browser.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory or checkpoint")
    parser.add_argument("--sentence", default=SENTENCE)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--nbest", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("docs/figures/serve.png"))
    args = parser.parse_args()
    device, precision = resolve_runtime("cpu", "fp32")
    served = load(args.run, device, precision, None, Limits())
    with serving(served) as url:
        screenshot(url, args.sentence, args.beam, args.nbest, args.output)
    print(args.output)


if __name__ == "__main__":
    main()
