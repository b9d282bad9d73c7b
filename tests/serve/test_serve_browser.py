"""The grader page in a real browser: Debian's headless Chromium driven by Playwright.

Two good photographs and a broken one are uploaded, and a third good one whose name is a
spreadsheet formula; four rows appear in #results (three graded, one with its error), a Grad-CAM
view opens, and the downloaded CSV equals the one predict.py's CLI wrote for the same files,
the formula name neutralised by the same rule. No request may leave the machine: the page works
offline. The API docs render under their own Content-Security-Policy. With
M2CNN_SCREENSHOT=docs/grader.png the page is also saved as that screenshot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from _required import skip_or_fail
from _served import FORMULA_NAME, SIZE, TOKEN, assert_same_csv

from m2cnn_tf.prediction import csv_text

pytestmark = pytest.mark.slow  # make test-quick leaves these out

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL = "apt-get install -y chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-proxy-server",
    "--disable-background-networking", "--disable-component-update", "--no-first-run",
    "--disable-sync", "--disable-default-apps", "--disable-extensions",
]  # fmt: skip
FINISHED = "#results tbody tr[data-state=done], #results tbody tr[data-state=error]"


@pytest.fixture(scope="module")
def browser_page(server):
    if CHROMIUM is None:
        skip_or_fail(f"no Chromium found: install it with `{INSTALL}` (never `playwright install`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements.txt")
    outside: list[str] = []

    def loopback_only(route):
        host = urlsplit(route.request.url).hostname or ""
        if route.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = browser.new_context(
            accept_downloads=True, viewport={"width": 1360, "height": 860}
        )
        context.route("**/*", loopback_only)
        page = context.new_page()
        page.set_default_timeout(120_000)
        sync_api.expect.set_options(timeout=120_000)
        yield page, outside, sync_api
        browser.close()


def test_upload_photos_and_a_broken_one_view_gradcam_and_download_predict_py_csv(
    server, photos, predict_rows, browser_page
):
    page, outside, sync_api = browser_page
    page.goto(f"{server.url}/?token={TOKEN}")  # stores the token in a cookie, back to /
    assert urlsplit(page.url).path == "/" and "token" not in page.url
    assert "research use only, not a medical device" in page.locator("#model").inner_text().lower()

    paths = [photos["good_jpeg"], photos["good_png"], photos["truncated"], photos["formula"]]
    page.set_input_files("#pick-files", [str(p) for p in paths])
    sync_api.expect(page.locator(FINISHED)).to_have_count(4)  # no eval: the page's CSP holds
    rows = page.locator("#results tbody tr")
    assert rows.count() == 4
    states = [rows.nth(i).get_attribute("data-state") for i in range(4)]
    assert states == ["done", "done", "error", "done"]
    assert "truncated JPEG" in rows.nth(2).inner_text()
    expected = predict_rows(paths)
    for i in (0, 1, 3):
        grade_cell = rows.nth(i).locator("td.grade").inner_text()
        assert grade_cell.startswith(expected[i]["grade"])
    if os.environ.get("M2CNN_SCREENSHOT"):
        page.screenshot(path=os.environ["M2CNN_SCREENSHOT"], full_page=True)

    rows.nth(0).click()  # the preprocessed photograph beside its Grad-CAM overlay
    sync_api.expect(page.locator("#gradcam-img")).to_have_js_property("naturalWidth", 2 * SIZE)
    assert page.locator("#gradcam-view").is_visible()
    page.keyboard.press("Escape")

    with page.expect_download() as download:
        page.click("#download")
    got = Path(download.value.path()).read_bytes().decode("utf-8")
    assert_same_csv(got, _with_file_names(predict_rows.csv_text(paths)))
    assert f"\r\n'{FORMULA_NAME},{expected[3]['grade']}," in got  # a text cell, not a formula
    assert outside == []  # nothing was fetched from outside the machine


def test_the_api_docs_render_under_their_content_security_policy(server, browser_page):
    page, _, sync_api = browser_page
    refused = []
    page.on("console", lambda m: "Content Security Policy" in m.text and refused.append(m.text))
    page.goto(f"{server.url}/?token={TOKEN}")
    page.goto(f"{server.url}/docs")
    sync_api.expect(page.locator(".swagger-ui .info .title")).to_contain_text("M²CNN grader")
    sync_api.expect(page.locator(".opblock-summary-path").first).to_be_visible()
    assert refused == []


def _with_file_names(predicted: str) -> str:
    """predict.py's CSV with its `path` column cut to the file name, which is all a browser
    sends of a file's path (a name that is a formula then neutralised, predict.py's rule)."""
    lines = predicted.split("\r\n")
    for i, line in enumerate(lines[1:], start=1):
        if line:
            path, rest = line.split(",", 1)
            lines[i] = f"{csv_text(Path(path).name)},{rest}"
    return "\r\n".join(lines)
