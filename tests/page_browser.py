"""Headless Chromium for the chat page's tests (tests/test_page.py, tests/test_page_ray.py).

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them), pointed at explicitly: Selenium never
runs Selenium Manager (it would try to download a driver and a browser). Without them a test skips with the
reason, except under ``CI=true``, where it fails: CI must not pass by skipping the browser.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("POLYMODAL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("POLYMODAL_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or ``None``."""
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"no {what} at {path} (Debian: {INSTALL}; or set POLYMODAL_{what.upper()})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def require_browser() -> None:
    """Skip (or, under ``CI=true``, fail) when the browser or Selenium is missing."""
    reason = missing_browser()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the browser tests cannot run: {reason}")
    pytest.skip(f"browser tests need headless Chromium: {reason}")


def chromium(width: int = 1100, height: int = 900):
    """A headless Chromium WebDriver (Debian's binaries, no Selenium Manager)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--autoplay-policy=no-user-gesture-required",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--force-color-profile=srgb", "--hide-scrollbars"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def browser_fixture(shots: Path) -> Iterator["Page"]:
    """Starts Chromium (or skips / fails, see :func:`require_browser`); yields a :class:`Page`; quits it."""
    require_browser()
    driver = chromium()
    try:
        yield Page(driver, shots)
    finally:
        driver.quit()


class Page:
    """The chat page in one browser tab, with the waits and reads the tests share."""

    def __init__(self, driver, shots: Path):
        self.driver, self.shots = driver, shots
        self.base = ""

    # ---- navigation and state ----------------------------------------------------------------------
    def open(self, base: str, *, downloads: Path | None = None, expect_model: bool = True) -> None:
        self.base = base
        self.driver.get(base + "/")
        self.js("document.getElementById('conversation').style.scrollBehavior = 'auto'")  # screenshots: no mid-scroll
        if downloads is not None:
            self.driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                                        {"behavior": "allow", "downloadPath": str(downloads)})
        if expect_model:
            self.wait("return window.document.querySelectorAll('#output-boxes input').length > 0 || "
                      "document.getElementById('key-panel').hidden === false", what="the model card")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def js_async(self, script: str, *args):
        """``script`` gets ``done`` (call it with the result) as its last argument."""
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];\n" + script, *args)

    def wait(self, script: str, *args, timeout_s: float = 120.0, what: str = "the page"):
        """Polls ``script`` (a JS function body returning a value) until it is truthy; returns that value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                path = self.shot("timeout")
                errors = self.js("return [...document.querySelectorAll('.error-box, .banner')]"
                                 ".map(e => e.textContent).join(' | ')")
                raise AssertionError(f"waited {timeout_s:g} s for {what}; page errors: {errors!r}; "
                                     f"screenshot: {path}")
            time.sleep(0.1)

    def shot(self, name: str) -> Path:
        """A screenshot of the whole page (its scrolled conversation at the bottom) at ``shots/name.png``."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path

    # ---- the conversation ----------------------------------------------------------------------------
    def record_requests(self) -> None:
        """Keeps every chat request body (``window.__sent``) and a copy of every chat response body
        (``window.__received``), without changing what the page gets."""
        self.js("""
            if (window.__sent) return;
            window.__sent = []; window.__received = [];
            const original = window.fetch;
            window.fetch = async (url, init) => {
              const chat = String(url).endsWith('/v1/chat/completions');
              if (chat) window.__sent.push(JSON.parse(init.body));
              const r = await original(url, init);
              if (chat) { const i = window.__received.push(null) - 1; r.clone().text().then(t => { window.__received[i] = t; }); }
              return r;
            };""")

    def type_and_send(self, text: str) -> None:
        from selenium.webdriver.common.by import By

        box = self.driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(text)
        self.driver.find_element(By.ID, "send").click()

    def answers(self) -> int:
        return self.js("return document.querySelectorAll('.msg.assistant').length")

    def wait_answer(self, n: int, timeout_s: float = 180.0) -> str:
        """Waits until answer ``n`` (1-based) is done or failed; returns its state (``done`` / ``error``)."""
        return self.wait(
            "const a = document.querySelectorAll('.msg.assistant')[arguments[0] - 1];"
            "return a && ['done', 'error', 'stopped'].includes(a.dataset.state) ? a.dataset.state : null;",
            n, timeout_s=timeout_s, what=f"answer {n}")

    def attach_files(self, *paths: Path) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in paths))
        self.wait("return document.querySelectorAll('#attachments li').length >= arguments[0]", len(paths),
                  what="the attachments")

    def drop_file(self, name: str, mime: str, data: bytes) -> None:
        """Drops a file on the page as a user's drag and drop does (a ``drop`` event with a DataTransfer)."""
        self.js("""
            const [name, mime, b64] = arguments;
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: mime}));
            for (const type of ['dragenter', 'dragover', 'drop']) {
              window.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""", name, mime, base64.b64encode(data).decode())
        self.wait("return [...document.querySelectorAll('#attachments .name')].some(n => n.textContent === arguments[0])",
                  name, what=f"the dropped file {name}")
