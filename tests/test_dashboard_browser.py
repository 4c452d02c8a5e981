"""The dashboard end to end in headless Chromium (Selenium and Debian's chromium-driver),
over real HTTP: overview, filtering, a job page, a retry that a live pool runs, a job that
appears without a reload, XSS payloads rendered as text, read-only mode.

Each page visited is saved as a screenshot in the test's tmp dir (and, when
``KONGTASK_DASHBOARD_SCREENSHOTS`` names a directory, there too: that is how the pictures
in docs/dashboard.md are made). Without chromium this module skips, except under
``CI=true``, where it fails: the dashboard's browser behaviour must not go untested in CI.

Rules: as in test_worker.py. Selenium blocks, so its calls run in a worker thread while the
server and the pool run in the test's trio loop; waits are polls with a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from dashboard_support import serving
from test_worker import wait_until

import kongtask

T = TypeVar("T")
XSS = "<script>alert(1)</script>"


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = []
    if browser is None:
        missing.append("chromium")
    if driver is None:
        missing.append("chromedriver (chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        reason = f"browser tests need {', '.join(missing)}"
        if _under_ci():
            pytest.fail(f"{reason} (CI=true: the browser tests may not skip)", pytrace=False)
        pytest.skip(reason)
    assert browser is not None
    assert driver is not None
    return browser, driver


@pytest.fixture
def driver() -> Iterator[Any]:
    browser, chromedriver = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1200,800")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    chrome = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


class Page:
    """The browser, driven from trio: every Selenium call runs in a worker thread."""

    def __init__(self, driver: Any, base: str, shots: Path) -> None:
        self.driver = driver
        self.base = base
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args))

    async def open(self, path: str) -> None:
        await self.call(self.driver.get, self.base + path)

    async def text(self, css: str, *, missing_ok: bool = False) -> str:
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )
        from selenium.webdriver.common.by import By

        def read() -> str:
            # a live page swaps its live region in at any refresh: find it again then
            for _ in range(20):
                try:
                    return str(self.driver.find_element(By.CSS_SELECTOR, css).text)
                except StaleElementReferenceException:
                    continue
                except NoSuchElementException:
                    if missing_ok:  # the next page is still loading
                        return ""
                    raise
            raise AssertionError(f"{css} kept being replaced")

        return await self.call(read)

    async def count(self, css: str) -> int:
        from selenium.webdriver.common.by import By

        return len(await self.call(self.driver.find_elements, By.CSS_SELECTOR, css))

    async def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        await self.call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def type(self, css: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        def fill() -> None:
            field = self.driver.find_element(By.CSS_SELECTOR, css)
            field.clear()
            field.send_keys(text)

        await self.call(fill)

    async def select(self, css: str, value: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        await self.call(
            lambda: Select(self.driver.find_element(By.CSS_SELECTOR, css)).select_by_value(value)
        )

    async def statuses(self, url: str) -> list[int]:
        """The HTTP statuses of the responses for ``url`` since the last call."""

        def read() -> list[int]:
            found = []
            for entry in self.driver.get_log("performance"):
                message = json.loads(entry["message"])["message"]
                if message["method"] == "Network.responseReceived":
                    response = message["params"]["response"]
                    if response["url"] == url:
                        found.append(int(response["status"]))
            return found

        return await self.call(read)

    async def script(self, code: str) -> Any:
        return await self.call(self.driver.execute_script, code)

    async def has_alert(self) -> bool:
        from selenium.common.exceptions import NoAlertPresentException

        def check() -> bool:
            try:
                self.driver.switch_to.alert  # noqa: B018
            except NoAlertPresentException:
                return False
            return True

        return await self.call(check)

    async def wait_for_text(self, css: str, text: str, limit: float = 15) -> None:
        async def shown() -> bool:
            return text in await self.text(css, missing_ok=True)

        await wait_until(shown, limit)

    async def wait_for_url(self, fragment: str, limit: float = 15) -> None:
        async def arrived() -> bool:
            return fragment in await self.call(lambda: str(self.driver.current_url))

        await wait_until(arrived, limit)

    async def shot(self, name: str) -> None:
        path = self.shots / f"{name}.png"

        def save() -> None:
            assert self.driver.save_screenshot(str(path))
            assert path.stat().st_size > 1000
            extra = os.environ.get("KONGTASK_DASHBOARD_SCREENSHOTS")
            if extra:
                Path(extra).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, Path(extra) / path.name)

        await self.call(save)


async def seed(client: kongtask.Client) -> list[int]:
    """Two failed ``send_email`` jobs (XSS in their error), a scheduled one, other work."""
    failed = []
    later = datetime.now(UTC) + timedelta(hours=1)
    for n in range(3):
        job = await client.add_job(
            "send_email", {"to": f"user{n}@example.com"}, max_attempts=3, run_at=later
        )
        failed.append(job.id)
    await client.permanently_fail_jobs(failed[:2], f"SMTP said no {XSS}")
    await client.add_job("resize_image", {"id": 7}, queue_name="images")
    await client.add_job(f"evil{XSS}", {"html": XSS}, job_key=XSS)
    return failed


async def test_overview_filter_job_retry_by_a_live_pool_and_live_updates(
    kongtask_dsn: str, driver: Any, tmp_path: Path
) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        failed = await seed(client)
        async with serving(kongtask_dsn) as (url, _):
            page = Page(driver, url, tmp_path / "shots")
            await page.open("/")
            assert await page.text("h1") == "Overview"
            totals = await page.text("#totals")
            assert "permanently_failed" in totals
            assert f"evil{XSS}" in await page.text("#by-task")  # as text, not markup
            await page.shot("overview")

            await page.open("/jobs")
            await page.type("input[name=task]", "send_email")
            await page.select("select[name=state]", "permanently_failed")
            await page.click("#apply-filters")
            await page.wait_for_url("state=permanently_failed")
            await page.wait_for_text("h1", "Jobs")
            rows = await page.count("#jobs tr") - 1
            assert rows == 2
            listing = await page.text("#jobs")
            assert "resize_image" not in listing
            assert listing.count("permanently_failed") == 2
            await page.shot("jobs")

            await page.click(f"#jobs a[href='/jobs/{failed[1]}']")
            await page.wait_for_text("h1", f"Job {failed[1]}")
            assert await page.text("#state") == "permanently_failed"
            assert await page.text("#last-error") == f"SMTP said no {XSS}"
            assert not await page.has_alert()
            await page.shot("job")

            ran = trio.Event()
            ran_ids: list[int] = []

            async def send_email(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
                ran_ids.append(job.id)
                ran.set()

            async with kongtask.open_worker(
                kongtask_dsn, {"send_email": send_email}, poll_interval=0.2
            ):
                await page.click("#action-retry")
                await page.wait_for_text("h1", "Confirm")
                await page.shot("confirm")
                await page.click("#confirm")
                await page.wait_for_text("#result", "1 of 1 job(s) changed")
                with trio.fail_after(15):
                    await ran.wait()
                assert ran_ids == [failed[1]]

                async def completed() -> bool:  # the pool records the outcome just after
                    await page.open(f"/jobs/{failed[1]}")
                    return await page.count("#missing") == 1

                await wait_until(completed)

            await page.open("/jobs")
            await page.script("window.kongtaskMarker = 'no reload';")
            fresh = await client.add_job("fresh_arrival", {"n": 1})
            await page.wait_for_text("#jobs", "fresh_arrival")
            assert await page.script("return window.kongtaskMarker;") == "no reload"
            assert str(fresh.id) in await page.text("#jobs")

            await page.open("/")
            await page.script("window.kongtaskMarker = 'no reload';")
            await client.add_job("another_arrival", {})
            await page.wait_for_text("#by-task", "another_arrival")
            assert await page.script("return window.kongtaskMarker;") == "no reload"

            await page.open("/pools")
            await page.shot("pools")
            await page.open("/cron")
            await page.shot("cron")
            assert not await page.has_alert()


async def test_xss_payloads_render_as_text_and_read_only_has_no_action(
    kongtask_dsn: str, driver: Any, tmp_path: Path
) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        await seed(client)
        (evil,) = await client.list_jobs(tasks=f"evil{XSS}")
    async with serving(kongtask_dsn, read_only=True) as (url, _):
        page = Page(driver, url, tmp_path / "shots")
        await page.open(f"/jobs/{evil.job.id}")
        assert await page.text("#task") == f"evil{XSS}"
        assert XSS in await page.text("#payload")
        assert await page.count("script:not([src])") == 0
        assert not await page.has_alert()
        assert await page.count("a.action") == 0
        assert await page.count("form[method=post]") == 0
        await page.open("/jobs")
        assert await page.count("a.bulk") == 0
        assert "read-only" in await page.text("header")
        await page.shot("read-only")


async def test_unlock_a_dead_pool_and_retry_a_filter_in_bulk(
    kongtask_dsn: str, driver: Any, tmp_path: Path
) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        failed = await seed(client)
        held = await client.add_job("held_by_the_dead", {})
        await client._db.execute(
            "update graphile_worker._private_jobs set locked_by = 'pool-deadbeef', "
            "locked_at = now() - interval '1 hour', attempts = 1 where id = $1",
            held.id,
        )
        async with serving(kongtask_dsn) as (url, _):
            page = Page(driver, url, tmp_path / "shots")
            await page.open("/pools")
            assert "pool-deadbeef" in await page.text("#pools")
            await page.shot("pools-dead")
            await page.click("a.unlock")
            await page.wait_for_text("#question", "pool pool-deadbeef")
            await page.click("#confirm")
            await page.wait_for_text(
                "#result", "Unlocked the jobs and queues of pool pool-deadbeef"
            )
            (info,) = await client.list_jobs(ids=[held.id])
            assert info.job.locked_by is None
            assert info.state == "ready"
            await page.click("#back")
            await page.wait_for_text("#pools", "No pool holds a lock")

            await page.open("/jobs?task=send_email&state=permanently_failed")
            assert await page.count("#jobs tr") - 1 == 2
            await page.click("a.bulk[href*='action=retry']")
            await page.wait_for_text("#question", "(2 job(s) now)")
            await page.shot("bulk-confirm")
            await page.click("#confirm")
            await page.wait_for_text("#result", "2 of 2 job(s) changed")
            infos = await client.list_jobs(ids=failed)
            assert sorted(i.job.id for i in infos if i.state == "ready") == failed[:2]


async def evil_site(html: str, *, task_status: trio.TaskStatus[int]) -> None:
    """Serve one page from another origin (another port) until cancelled."""
    body = html.encode()

    async def answer(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            seen = b""
            while b"\r\n\r\n" not in seen:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                seen += chunk
            head = (
                "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            await stream.send_all(head.encode() + body)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


async def test_the_browser_meets_the_auth_and_csrf_refusals(
    kongtask_dsn: str, driver: Any, tmp_path: Path
) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        target = await client.add_job("keep_me", {})
    auth = kongtask.DashboardAuth(username="admin", password="pw")
    async with serving(kongtask_dsn, auth=auth) as (url, _), trio.open_nursery() as nursery:
        page = Page(driver, url, tmp_path / "shots")
        await page.open("/")
        # headless Chromium cancels the basic-auth prompt: the status is in its network log
        assert await page.statuses(url + "/") == [401]
        assert await page.count("#totals") == 0
        # credentials in the URL: Chromium answers the basic-auth challenge with them, and
        # keeps them for the realm's later requests
        await page.call(driver.get, url.replace("http://", "http://admin:pw@") + "/")
        await page.wait_for_text("h1", "Overview")
        await page.open(f"/jobs/{target.id}")
        await page.wait_for_text("#task", "keep_me")

        form = (
            f'<form method="post" action="{url}/action">'
            '<input type="hidden" name="csrf" value="forged-token-forged-token-forged-token">'
            '<input type="hidden" name="action" value="complete">'
            f'<input type="hidden" name="id" value="{target.id}">'
            '<button id="go" type="submit">win a prize</button></form>'
        )
        port = await nursery.start(evil_site, f"<!doctype html><title>evil</title>{form}")
        await page.call(driver.get, f"http://127.0.0.1:{port}/")
        await page.click("#go")
        await page.wait_for_text("#error", "request refused")
        await page.shot("csrf-refused")
        async with kongtask.open_client(kongtask_dsn) as client:
            assert len(await client.list_jobs(ids=[target.id])) == 1
        nursery.cancel_scope.cancel()
