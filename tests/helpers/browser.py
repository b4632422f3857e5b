"""A real browser for the page tests: Debian's Chromium, headless, driven through its
version-matched chromedriver (both from `make tools`) with Selenium. It is cut off from
every host but loopback, as a browser on a cluster without internet would be, and it
records every request a page makes (Chrome's performance log) and every console message
(a Content-Security-Policy violation among them)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image, ImageStat
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

from tests.helpers.paths import ROOT, tool

#: Seconds a page may take to show what a test waits for (a wait ends as soon as it does).
WAIT_S = 60
#: Where the tests save screenshots for the docs, when set (SCREENSHOTS=docs/img): a normal
#: run does not rewrite tracked files.
SCREENSHOTS = os.environ.get("SCREENSHOTS")


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[WebDriver]:
    """Headless Chromium on a window of ``width`` x ``height``; quit on exit."""
    options = webdriver.ChromeOptions()
    options.binary_location = tool("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        # Nothing but loopback resolves: what the pages load must come from the gateway.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        # The browser's own traffic (updates, sync, field trials), which no page asked for.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(tool("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], object], what: str) -> object:
    """``condition``'s first true value, polled until it has one."""
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition, what)


def requests_made(driver: WebDriver) -> list[str]:
    """The URL of every request the browser's pages began since the last call (the
    performance log is drained as it is read)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def elsewhere(urls: list[str], gateway: str) -> list[str]:
    """The requests of ``urls`` to anywhere but ``gateway``'s origin (``blob:`` and ``data:``
    URLs are the page's own memory, not requests to a host)."""
    origin = urlsplit(gateway)
    return [
        url
        for url in urls
        if urlsplit(url).scheme not in ("blob", "data")
        and (urlsplit(url).scheme, urlsplit(url).netloc) != (origin.scheme, origin.netloc)
    ]


def console_errors(driver: WebDriver) -> list[str]:
    """Console messages of level SEVERE since the last call: script errors, failed loads,
    Content-Security-Policy violations."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def not_blank(png: bytes) -> tuple[float, float]:
    """(the grey level's standard deviation, the share of pixels unlike the most common
    colour) of a screenshot: a blank page has both near 0."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    grey = image.convert("L")
    colours = image.getcolors(maxcolors=image.width * image.height) or []
    most = max(count for count, _ in colours)
    return ImageStat.Stat(grey).stddev[0], 1 - most / (image.width * image.height)


def save_screenshot(driver: WebDriver, name: str) -> bytes:
    """The page as PNG; also written to ``$SCREENSHOTS/name`` when that is set."""
    png: bytes = driver.get_screenshot_as_png()
    if SCREENSHOTS:
        folder = Path(SCREENSHOTS)
        folder = folder if folder.is_absolute() else ROOT / folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png)
    return png
