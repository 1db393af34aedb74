"""A real browser: headless Chromium from Debian (``chromium``, ``chromium-driver``; see
scripts/ensure-system-packages.sh) driven by selenium, as a person uses a hub.

- :func:`browser_unavailable`: why no browser can run here (None: it can).
- :class:`Browser`: one Chromium (its own profile: its own cookies, so one person),
  with the few steps the tests take -- ``login()``, ``open()``, ``wait_text()``,
  ``wait_url()``, ``shot()`` -- each waiting on the page, never on a clock alone.
  Closed (its driver and Chromium stopped) by ``close()`` or as a context manager.

Selenium's calls block: the async tests run them in a thread (``asyncio.to_thread``)
so that the event loop (and the Outposts the test holds) keeps running.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMEDRIVER = "/usr/bin/chromedriver"


def browser_unavailable() -> str | None:
    """None if a headless Chromium can be driven here; else why not."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not os.access(CHROMEDRIVER, os.X_OK) or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "chromium and chromium-driver are not installed (scripts/ensure-system-packages.sh)"
    return None


class Browser:
    """One headless Chromium, its screenshots in ``shots`` (a directory)."""

    def __init__(self, shots: Path, *, timeout: float = 60):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000",
                    "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions"):  # fmt: skip
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.shots = shots
        self.timeout = timeout

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.driver.quit()

    # --- steps ------------------------------------------------------------------------------

    def open(self, url: str) -> None:
        self.driver.get(url)

    def login(self, hub_url: str, user: str, password: str = "any") -> None:
        """Log in on the hub's login page (the dummy authenticator takes any password)."""
        from selenium.webdriver.common.by import By

        self.open(f"{hub_url}/hub/login")
        self.driver.find_element(By.ID, "username_input").send_keys(user)
        self.driver.find_element(By.ID, "password_input").send_keys(password)
        self.driver.find_element(By.ID, "login_submit").click()
        self.wait(lambda d: "/hub/login" not in d.current_url, f"{user} is still on the login page")

    def css(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def css_all(self, selector: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    @property
    def text(self) -> str:
        """What a person reads on the page."""
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait(self, condition, message: str) -> None:
        """Until ``condition(driver)`` is true (at most ``timeout`` s: then a screenshot
        and an AssertionError with ``message`` and what the page says)."""
        from selenium.common.exceptions import TimeoutException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            WebDriverWait(self.driver, self.timeout, poll_frequency=0.2, ignored_exceptions=(WebDriverException,)).until(
                condition
            )
        except TimeoutException:
            shot = self.shot("timeout")
            raise AssertionError(f"{message} ({self.driver.current_url}; {shot}):\n{self.text[-2000:]}") from None

    def wait_text(self, words: str) -> None:
        """Until the page shows ``words``."""
        self.wait(lambda d: words in self.text, f"the page never said {words!r}")

    def wait_url(self, prefix: str) -> None:
        """Until the browser is at a URL that starts with ``prefix``."""
        self.wait(lambda d: d.current_url.startswith(prefix), f"never reached {prefix}")

    def shot(self, name: str) -> Path:
        """A screenshot (look at it: the tests are about what a person reads)."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path
