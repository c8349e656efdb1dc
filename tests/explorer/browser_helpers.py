"""Browser helpers of the explorer tests: Debian's Chromium through Selenium and chromium-driver.

Never a downloaded browser: the system's ``/usr/bin/chromium`` and
``/usr/bin/chromedriver``, started headless with everything that would reach
the network switched off.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from explorer_helpers import ARTIFACTS

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               "--window-size=1280,900"]


def wait_js(drv: Any, script: str, *, timeout_s: float = 60, what: str = "") -> Any:
    """Wait until ``script`` returns something true; on timeout save what the page showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    try:
        value = WebDriverWait(drv, timeout_s, poll_frequency=0.2).until(lambda d: d.execute_script(script))
        print(f"{time.monotonic() - started:6.2f} s  {what or script}")  # shown when the test fails
        return value
    except TimeoutException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(ARTIFACTS / "failure.png"))
        body = drv.execute_script("return document.body.innerText")
        raise AssertionError(f"timed out waiting for {what or script}; the page shows:\n{body}") from None


def screenshot(drv: Any, name: str, *, width: int, mobile: bool = False) -> Path:
    """A full-page screenshot at ``width`` CSS pixels."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": mobile})
    height = int(drv.execute_script("return Math.ceil(document.documentElement.scrollHeight)"))
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": min(height, 8000), "deviceScaleFactor": 1, "mobile": mobile})
    path = ARTIFACTS / name
    drv.save_screenshot(str(path))
    return path


def text_of(drv: Any, element_id: str) -> str:
    return str(drv.execute_script(f"return document.getElementById('{element_id}').innerText"))


def open_driver() -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in CHROME_ARGS:
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()
