"""The operator's web console in a real browser (headless Chromium through Selenium) against a live deployment.

A `carechain bridge --http` process with contracts, five bonded `carechain miner` processes (final = 3 of 5,
tests/live_world.py) and a `carechain agent` process whose thermometer seals its readings to the patient; the
doctor's access request and the patient's grant go on the ledger as the access CLI builds them. The browser
signs in with the real console accounts, opens every page, checks the figures against the ledger, watches a
figure grow without a reload, and is refused the access log as an operator. A screenshot of each page is saved
under pytest's tmp dir and, when $CARECHAIN_SCREENSHOTS names a directory, there too.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from carechain.config import ConsoleConfig
from carechain.entries import Registration, registration_entry
from carechain.identity import Identity
from chain_bridge.console.accounts import AccountBook, Role
from chain_bridge.ledger.store import Ledger
from chain_bridge.registry import ledger_path
from simulators.miners import CARECHAIN
from simulators.ports import free_port
from tests.access_world import Process, now_ms, wait_for
from tests.live_world import LiveWorld

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PASSWORD = "a long console password"
PAGES = {"overview": "/", "fleet": "/fleet", "ingest": "/ingest", "checkpoints": "/checkpoints",
         "contracts": "/contracts", "storage": "/storage", "access": "/access", "consents": "/consents"}
REFRESH_S = ConsoleConfig.model_fields["refresh_s"].default  # the world's console keeps the default
WAIT_S = 60.0  # a bound so a broken run fails instead of hanging; nothing asserts on timing

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium (the test extra)")
if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
    pytest.skip(f"the browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install chromium chromium-driver", allow_module_level=True)


class ConsoleWorld(LiveWorld):
    """LiveWorld with the console on, its two accounts, and a `carechain agent` running a sealed thermometer."""

    def set_up_console(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bridge = Process("bridge", [*CARECHAIN, "bridge", "--config", str(self.config), "--verbose",
                                         "--http", f"127.0.0.1:{self.port}"], self.root, self.root / "bridge.log")
        book = AccountBook(self.bridge_dir / "console" / "accounts.json")
        book.add("olga", PASSWORD, [Role.OPERATOR])
        book.add("pete", PASSWORD, [Role.PRIVACY_OFFICER])
        self.thermometer = Identity.generate()
        self.thermometer.save(self.keys / "thermometer.key")
        ledger = Ledger(ledger_path(self.bridge_dir))
        try:
            reg = Registration(dev=self.thermometer.device_id, pk=self.thermometer.public_key, profile="thermometer",
                               owner=self.patient.id, site="ward-7", ts=now_ms())
            ledger.append_registrations([(registration_entry(self.operator, reg), reg)])
        finally:
            ledger.close()

    def start_agent(self) -> None:
        config = self.root / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "broker": {"host": self.broker.host, "port": self.broker.port},
            "agent": {"data_dir": str(self.root / "agent"), "bridge_public_key": self.log_public_key.hex(),
                      "speedup": 20.0, "devices": [{
                          "key_file": str(self.keys / "thermometer.key"), "profile": "thermometer",
                          "owner": self.patient.id, "owner_pre_key": self.patient.pre.public_key.hex()}]}}))
        self.agent = Process("agent", [*CARECHAIN, "agent", "--config", str(config)], self.root,
                             self.root / "agent.log")
        self.agent.start()

    def stop(self) -> None:
        agent = getattr(self, "agent", None)
        if agent is not None:
            agent.stop()
        super().stop()

    def count(self, sql: str) -> int:
        db = sqlite3.connect(f"file:{ledger_path(self.bridge_dir)}?mode=ro", uri=True, timeout=30)
        try:
            return int(db.execute(sql).fetchone()[0])
        finally:
            db.close()

    def events(self) -> int:
        return self.count("SELECT COUNT(*) FROM entries WHERE type='event'")


@pytest.fixture(scope="module")
def world(broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleWorld]:  # noqa: ANN401
    if broker.kind != "mosquitto":
        pytest.skip("needs mosquitto (retained checkpoints and the miners' topics as in production)")
    # Five bonded miners (final = 3 of 5): a grant seals 5 key fragments, one per miner.
    w = ConsoleWorld(tmp_path_factory.mktemp("console-world"), broker.config, n_miners=5, threshold=3)
    try:
        w.start(before_processes=w.set_up_console)
        w.bridge.wait_output(f"console: {w.url}")
        w.start_agent()
        wait_for("the agent's thermometer readings on the ledger", lambda: w.count(
            f"SELECT COUNT(*) FROM events WHERE device_id='{w.thermometer.device_id}'") >= 2, WAIT_S, w.logs)
        w.append_grants([{"purpose": "follow-up"}])
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any, str], Path]:
    here = tmp_path_factory.mktemp("screenshots")
    extra = os.environ.get("CARECHAIN_SCREENSHOTS")

    def save(driver: Any, name: str) -> Path:  # noqa: ANN401 - a selenium WebDriver
        path = here / f"console-{name}.png"
        assert driver.save_screenshot(str(path)), f"no screenshot of {name}"
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)
        return path

    return save


def _browser() -> Any:  # noqa: ANN401 - a selenium WebDriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # Debian's: Selenium Manager never downloads a browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--disable-gpu", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    return driver


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _browser()
    try:
        yield driver
    finally:
        driver.quit()


def _sign_in(driver: Any, world: ConsoleWorld, name: str) -> None:  # noqa: ANN401
    from selenium.webdriver.common.by import By

    driver.get(world.url + "/")
    assert "/login" in driver.current_url, "an anonymous visitor is sent to the sign-in page"
    driver.find_element(By.ID, "user").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(f"{name} to be signed in", lambda: "/login" not in driver.current_url, WAIT_S)
    assert driver.find_element(By.ID, "user-name").text == name


def _figure(driver: Any, key: str) -> int:  # noqa: ANN401
    from selenium.webdriver.common.by import By

    text = driver.find_element(By.CSS_SELECTOR, f'[data-live="{key}"]').text
    assert re.fullmatch(r"[\d,]+", text), f"figure {key} shows {text!r}"
    return int(text.replace(",", ""))


def test_every_page_renders_with_the_ledgers_numbers_and_no_patient_id(world: ConsoleWorld, browser: Any,
                                                                      shots: Callable[[Any, str], Path]) -> None:
    _sign_in(browser, world, "pete")  # the privacy officer sees every page
    for name, path in PAGES.items():
        before = (world.events(), world.count("SELECT COUNT(*) FROM checkpoints"))
        if name == "overview":
            # The console reads new leaves at most once per refresh_s, whoever asks (a page load right after the
            # sampler's read shows that read): `before` must be at least that old to bound the page's figures.
            time.sleep(REFRESH_S)
        browser.get(world.url + path)
        assert browser.find_element("css selector", "h1").text, name
        html = browser.page_source
        assert world.patient.id not in html, f"the patient's id is on {name}"
        if name == "overview":  # the ledger grows meanwhile: the page's figure lies between two reads of it
            shown = (_figure(browser, "events"), _figure(browser, "checkpoints"))
            after = (world.events(), world.count("SELECT COUNT(*) FROM checkpoints"))  # after the figures were read
            assert before[0] <= shown[0] <= after[0]
            assert before[1] <= shown[1] <= after[1]
            assert _figure(browser, "devices") == world.count("SELECT COUNT(*) FROM devices") == 2
        if name == "fleet":
            assert _figure(browser, "profile:thermometer") == 1
            assert world.thermometer.device_id in html
        if name == "checkpoints":
            assert _figure(browser, "final_recorded") <= world.count(
                "SELECT COUNT(*) FROM entries WHERE type='checkpoint.final'")
            assert _figure(browser, "final_recorded") >= 1
        if name == "access":
            grants = world.count("SELECT COUNT(*) FROM entries WHERE type='access.grant'")
            assert _figure(browser, "grants") == grants == 1
            assert world.doctor.id in html  # the requester is named; the owner only by pseudonym
            assert re.search(r"p:[0-9a-f]{8}", html)
        shots(browser, name)


def test_live_figures_grow_without_a_reload(world: ConsoleWorld, browser: Any) -> None:
    _sign_in(browser, world, "olga")
    browser.get(world.url + "/ingest")
    browser.execute_script("window.consoleLoadMarker = 'same page';")
    first = _figure(browser, "events")
    wait_for("the events figure to grow by itself", lambda: _figure(browser, "events") > first, WAIT_S, world.logs)
    assert browser.execute_script("return window.consoleLoadMarker;") == "same page", "the page was reloaded"
    assert _figure(browser, "events") <= world.events()


def test_the_access_log_is_refused_to_an_operator(world: ConsoleWorld, browser: Any,
                                                  shots: Callable[[Any, str], Path]) -> None:
    from selenium.webdriver.common.by import By

    _sign_in(browser, world, "olga")
    assert "Access log" not in browser.find_element(By.TAG_NAME, "nav").text
    for path in ("/access", "/consents"):
        browser.get(world.url + path)
        assert browser.find_element(By.TAG_NAME, "h1").text == "Not for your role"
        assert "privacy_officer" in browser.find_element(By.ID, "error-detail").text
        assert world.doctor.id not in browser.page_source
    shots(browser, "refused")
    browser.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
    wait_for("the sign-out", lambda: "/login" in browser.current_url, WAIT_S)
    browser.get(world.url + "/fleet")
    assert "/login" in browser.current_url, "signed out: the pages are closed again"
