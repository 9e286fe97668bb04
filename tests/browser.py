"""Real headless Chromium for the tests of web pages (the operator console), driven by Selenium.

Debian's ``chromium`` and ``chromium-driver`` packages, found on PATH; the tests that need them skip naming the
packages when they are missing. Selenium is told both paths, so it never tries to download a browser.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import pytest

APT_HINT = "install them with `apt-get install -y chromium chromium-driver` (Debian/Ubuntu)"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

needs_chromium = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                    reason=f"chromium or chromedriver is not on PATH; {APT_HINT}")


@contextlib.contextmanager
def headless_chromium() -> Iterator:
    """A Selenium WebDriver on a fresh headless Chromium profile; quits it on exit."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--no-first-run", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
