"""The gateway's pages in a real browser (tests.helpers.browser: headless Chromium that can
reach nothing but loopback): /docs and /redoc render every operation, Swagger UI's "Try it
out" classifies an uploaded file, the page at / classifies a held-out digit (also at a
phone's width), and with API keys on both work with a key and say why without one. Every
test also holds that the browser asked nothing of any host but the gateway, and that no
Content-Security-Policy violation or script error was logged.

SCREENSHOTS=docs/img saves the screenshots the docs show (docs/api.md, "In a browser")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from service.host.processes import GatewayProcess
from tests.helpers.browser import (
    chromium,
    console_errors,
    elsewhere,
    not_blank,
    requests_made,
    save_screenshot,
    wait_for,
)
from tests.helpers.images import image_bytes

pytestmark = pytest.mark.external

KEY = "page-test-key"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


@pytest.fixture
def page(browser) -> Iterator[WebDriver]:
    """The browser, its logs drained first; after the test, what it asked for and logged
    is held to the rules of the module's docstring."""
    requests_made(browser)
    console_errors(browser)
    yield browser
    asked = requests_made(browser)
    assert asked, "no request recorded: the performance log is not being read"
    assert elsewhere(asked, browser.current_url) == []
    # Statuses the tests ask for (a 401) are logged as failed loads; anything else is not
    # expected: a policy violation, an uncaught error, an asset that did not load.
    errors = [e for e in console_errors(browser) if "status of 401" not in e]
    assert errors == []


@pytest.fixture(scope="module")
def tiny_gw(tiny, tmp_path_factory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess.start(
        tmp_path_factory.mktemp("pages") / "gw.log", "--repository", str(tiny.repository)
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def keyed_gw(tiny, tmp_path_factory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess.start(
        tmp_path_factory.mktemp("keyed") / "gw.log",
        "--repository",
        str(tiny.repository),
        env={"RESNET_SERVE_API_KEYS": KEY},
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "picture.png"
    path.write_bytes(image_bytes())
    return path


def operations(url: str) -> list[str]:
    """Every operation id of the gateway's OpenAPI document."""
    doc = httpx.get(url + "/openapi.json").json()
    return [op["operationId"] for path in doc["paths"].values() for op in path.values()]


def assert_shown(png: bytes) -> None:
    spread, unlike = not_blank(png)
    assert spread > 10 and unlike > 0.05, (spread, unlike)  # a blank page: both ~0


# --- /docs and /redoc ---------------------------------------------------------------------


def test_swagger_ui_renders_every_operation(tiny_gw, page):
    ids = operations(tiny_gw.url)
    page.get(tiny_gw.url + "/docs")
    wait_for(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == len(ids), "ops")
    shown = {
        e.get_attribute("id").rsplit("-", 1)[1]
        for e in page.find_elements(By.CSS_SELECTOR, ".opblock")
    }
    assert shown == set(ids)
    assert page.find_elements(By.CSS_SELECTOR, ".auth-wrapper .authorize")  # the key schemes
    assert_shown(save_screenshot(page, "docs-swagger.png"))


def test_redoc_renders_every_operation(tiny_gw, page):
    ids = operations(tiny_gw.url)
    page.get(tiny_gw.url + "/redoc")
    wait_for(
        page,
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, '[data-section-id^="operation/"]')) == len(ids)
        ),
        "operations",
    )
    shown = {
        e.get_attribute("data-section-id").removeprefix("operation/")
        for e in page.find_elements(By.CSS_SELECTOR, '[data-section-id^="operation/"]')
    }
    assert shown == set(ids)
    assert_shown(save_screenshot(page, "docs-redoc.png"))


def open_classify(page: WebDriver, url: str) -> WebElement:
    """Swagger UI's classify operation, opened, in "Try it out" mode, for model "tiny"."""
    page.get(url + "/docs#/classification/classify")
    op = wait_for(
        page, lambda d: d.find_elements(By.ID, "operations-classification-classify"), "op"
    )
    op = op[0]  # type: ignore[index]
    wait_for(page, lambda d: "is-open" in op.get_attribute("class"), "opened")
    op.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    op.find_element(By.CSS_SELECTOR, 'tr[data-param-name="model"] input').send_keys("tiny")
    return op


def execute(page: WebDriver, op: WebElement, picture: Path, status: str) -> str:
    """Attach ``picture`` (when no file is attached yet), press Execute and wait for the
    answer's ``status``: the response body Swagger UI shows."""
    upload = op.find_element(By.CSS_SELECTOR, 'tr[data-property-name="file"] input[type=file]')
    if not upload.get_attribute("value"):
        upload.send_keys(str(picture))
    op.find_element(By.CSS_SELECTOR, ".execute").click()
    cell = ".live-responses-table .response .response-col_status"
    wait_for(
        page,
        lambda d: any(e.text.strip() == status for e in op.find_elements(By.CSS_SELECTOR, cell)),
        f"status {status}",
    )
    body = op.find_element(By.CSS_SELECTOR, ".live-responses-table .response .microlight")
    return body.text


def test_swagger_try_it_out_classifies_an_uploaded_file(tiny_gw, page, picture):
    op = open_classify(page, tiny_gw.url)
    shown = json.loads(execute(page, op, picture, "200"))
    with picture.open("rb") as f:
        direct = httpx.post(tiny_gw.url + "/v1/models/tiny/classify", files={"file": f}).json()
    assert shown["model"] == "tiny"
    assert [p["index"] for p in shown["predictions"][0]] == [
        p["index"] for p in direct["predictions"][0]
    ]


# --- the page at / ------------------------------------------------------------------------


def heldout(url: str, demo, digit: int) -> tuple[Path, dict]:
    """The first held-out PNG of ``digit`` (by name) that the model classifies right over
    REST, and that answer's best prediction (the model is right on ~97 % of them: which
    ones is the accuracy test's business, not the page's)."""
    for path, label in demo.pngs():
        if label != digit:
            continue
        with path.open("rb") as f:
            resp = httpx.post(url + "/v1/models/digits/classify", files={"file": f})
        best = resp.json()["predictions"][0][0]
        if best["label"] == str(digit):
            return path, best
    raise AssertionError(f"no held-out {digit} classified right")


def bars(page: WebDriver) -> list[tuple[str, float]]:
    """(label, score) of each bar the page shows, top first."""
    return [
        (
            li.find_element(By.CSS_SELECTOR, ".label").text,
            float(li.find_element(By.CSS_SELECTOR, ".score").text),
        )
        for li in page.find_elements(By.CSS_SELECTOR, "#bars li")
    ]


def classify_in_page(page: WebDriver, path: Path) -> list[tuple[str, float]]:
    """Choose ``path`` in the page's file field (which classifies it) and wait for the bars."""
    page.execute_script("document.getElementById('bars').replaceChildren()")
    page.find_element(By.ID, "file").send_keys(str(path))
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#bars li"), "bars")
    return bars(page)


def open_try_page(page: WebDriver, url: str, model: str) -> None:
    page.get(url + "/")
    wait_for(page, lambda d: model in d.find_element(By.ID, "model").text, "models listed")
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#contract dt"), "contract shown")


def test_the_page_classifies_heldout_digits_right(server, demo, page):
    open_try_page(page, server.url, "digits")
    for digit in (7, 3):
        path, best = heldout(server.url, demo, digit)
        shown = classify_in_page(page, path)
        assert shown[0] == (str(digit), pytest.approx(best["score"], abs=1e-4))
        assert len(shown) == 5 and [s for _, s in shown] == sorted(
            (s for _, s in shown), reverse=True
        )
        assert "ms round trip" in page.find_element(By.ID, "latency").text
    contract = dict(
        zip(
            [e.text for e in page.find_elements(By.CSS_SELECTOR, "#contract dt")],
            [e.text for e in page.find_elements(By.CSS_SELECTOR, "#contract dd")],
            strict=True,
        )
    )
    expected = demo.contract
    assert contract["channels"] == expected.channels
    assert contract["resize"] == str(expected.resize) and contract["crop"] == str(expected.crop)
    assert_shown(save_screenshot(page, "try-page.png"))


def test_the_page_pins_a_version_and_a_top_k(server, demo, page):
    open_try_page(page, server.url, "digits")
    versions = [
        o.get_attribute("value") for o in page.find_elements(By.CSS_SELECTOR, "#version option")
    ]
    assert (
        versions[0] == ""
        and versions[1:] == httpx.get(server.url + "/v1/models/digits").json()["versions"]
    )
    page.find_element(By.CSS_SELECTOR, f'#version option[value="{versions[-1]}"]').click()
    top_k = page.find_element(By.ID, "top-k")
    top_k.clear()
    top_k.send_keys("3")
    path, _ = heldout(server.url, demo, 4)
    shown = classify_in_page(page, path)
    assert len(shown) == 3 and shown[0][0] == "4"
    assert f"version {versions[-1]}" in page.find_element(By.ID, "status").text


def test_the_page_fits_a_phone(server, demo, page):
    width = 390
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 844, "deviceScaleFactor": 2, "mobile": True},
    )
    try:
        open_try_page(page, server.url, "digits")
        path, _ = heldout(server.url, demo, 2)
        assert classify_in_page(page, path)[0][0] == "2"
        # Nothing sticks out sideways: no horizontal scrolling, every part within the width.
        assert page.execute_script("return document.documentElement.scrollWidth") <= width
        for selector in (
            "#model",
            "#version",
            "#top-k",
            "#drop",
            "#classify",
            "#bars li",
            "#contract",
        ):
            for element in page.find_elements(By.CSS_SELECTOR, selector):
                box = page.execute_script(
                    "return arguments[0].getBoundingClientRect().toJSON()", element
                )
                assert box["left"] >= 0 and box["right"] <= width, (selector, box)
        assert_shown(save_screenshot(page, "try-page-phone.png"))
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# --- with API keys --------------------------------------------------------------------------


def test_with_keys_the_page_asks_for_one_and_works_with_it(keyed_gw, page, picture):
    page.get(keyed_gw.url + "/")
    key = page.find_element(By.ID, "key")
    assert key.is_displayed()
    status = page.find_element(By.ID, "status")
    wait_for(page, lambda d: "401" in status.text, "the 401 shown")
    assert "an API key is required" in status.text
    key.send_keys(KEY, Keys.TAB)  # the key is taken when the field is left
    open_models = lambda d: "tiny" in d.find_element(By.ID, "model").text  # noqa: E731
    wait_for(page, open_models, "models listed with the key")
    shown = classify_in_page(page, picture)
    assert len(shown) == 5 and "tiny" in status.text


def test_without_keys_the_page_has_no_key_field(tiny_gw, page):
    open_try_page(page, tiny_gw.url, "tiny")
    assert not page.find_element(By.ID, "key").is_displayed()


def test_with_keys_swagger_ui_shows_the_401_then_authorizes(keyed_gw, page, picture):
    op = open_classify(page, keyed_gw.url)
    refused = json.loads(execute(page, op, picture, "401"))
    assert refused["error"]["code"] == "unauthorized"
    page.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize").click()
    modal = wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".modal-ux"), "modal")
    modal = modal[0]  # type: ignore[index]
    modal.find_element(By.ID, "api_key_value").send_keys(KEY)  # the X-API-Key scheme
    modal.find_element(By.CSS_SELECTOR, "button.authorize").click()
    modal.find_element(By.CSS_SELECTOR, "button.btn-done").click()
    shown = json.loads(execute(page, op, picture, "200"))
    assert shown["model"] == "tiny" and len(shown["predictions"][0]) == 5
