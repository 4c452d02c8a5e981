"""The dashboard over real HTTP (hypercorn on trio, httpx): authentication, CSRF, read-only
mode, escaping, the Content-Security-Policy, every action, and the live-update stream.

Rules: as in test_worker.py; each test serves the dashboard on a free loopback port of a
fresh database.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import trio
from dashboard_support import serving
from test_worker import wait_until

import kongtask
from kongtask._dashboard import CSP, DashboardAuth

XSS = "<script>alert(1)</script>"


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


async def confirm_and_post(http: httpx.AsyncClient, query: str, **extra: str) -> httpx.Response:
    """Open the confirmation page of an action and submit its form, as a browser would."""
    page = await http.get(f"/confirm?{query}")
    assert page.status_code == 200, page.text
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text))
    fields.update(extra)
    return await http.post("/action", data=fields)


async def test_every_response_has_the_policy_and_user_text_is_escaped(kongtask_dsn: str) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        job = await client.add_job(f"task{XSS}", {"note": XSS}, queue_name=XSS)
        await client.permanently_fail_jobs([job.id], XSS)
    async with serving(kongtask_dsn) as (url, _), httpx.AsyncClient(base_url=url) as http:
        paths = ["/", "/jobs", f"/jobs/{job.id}", "/pools", "/cron", "/nope", "/jobs/x", "/jobs/"]
        paths += [f"/jobs?task={XSS}", f"/confirm?action=fail&task={XSS}&max_id=9", "/j<b>"]
        for path in paths:
            response = await http.get(path)
            assert response.headers["content-security-policy"] == CSP
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "<script>alert" not in response.text, path
            assert response.status_code in {200, 400, 404}, path
        page = (await http.get(f"/jobs/{job.id}")).text
        assert (
            page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 4
        )  # task, queue, payload, error
        listing = (await http.get("/jobs", params={"queue": XSS})).text
        assert 'value="&lt;script&gt;alert(1)&lt;/script&gt;"' in listing
    assert "script-src 'self'" in CSP
    assert "unsafe-inline" not in CSP


async def test_authentication_is_asked_on_every_path(kongtask_dsn: str) -> None:
    auth = DashboardAuth(username="ops", password="pw-1", token="tok-2")
    async with (
        serving(kongtask_dsn, auth=auth) as (url, _),
        httpx.AsyncClient(base_url=url) as http,
    ):
        for path in ["/", "/jobs", "/static/dashboard.js", "/events"]:
            response = await http.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Basic")
        assert (await http.get("/", auth=("ops", "wrong"))).status_code == 401
        assert (await http.get("/", auth=("other", "pw-1"))).status_code == 401
        bad_bearer = {"authorization": "Bearer tok-3"}
        assert (await http.get("/", headers=bad_bearer)).status_code == 401
        assert (await http.post("/action", data={"action": "x"})).status_code == 401
        assert (await http.get("/", auth=("ops", "pw-1"))).status_code == 200
        assert (await http.get("/", auth=("anyone", "tok-2"))).status_code == 200
        good_bearer = {"authorization": "Bearer tok-2"}
        assert (await http.get("/", headers=good_bearer)).status_code == 200


async def test_actions_need_the_csrf_token_and_the_same_origin(kongtask_dsn: str) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        job = await client.add_job("victim", {})
    async with serving(kongtask_dsn) as (url, _), httpx.AsyncClient(base_url=url) as http:
        fields = {"action": "complete", "id": str(job.id)}
        # no cookie and no token: a forged form from another site
        assert (await http.post("/action", data=fields)).status_code == 403
        page = await http.get(f"/confirm?action=complete&id={job.id}")
        token = csrf_of(page.text)
        assert http.cookies.get("kongtask_csrf") == token
        wrong = await http.post(
            "/action", data={**fields, "csrf": token[:-1] + ("B" if token.endswith("A") else "A")}
        )
        assert wrong.status_code == 403
        assert (await http.post("/action", data=fields)).status_code == 403
        cross = await http.post(
            "/action", data={**fields, "csrf": token}, headers={"sec-fetch-site": "cross-site"}
        )
        assert cross.status_code == 403
        other = await http.post(
            "/action", data={**fields, "csrf": token}, headers={"origin": "http://evil.test"}
        )
        assert other.status_code == 403
        async with kongtask.open_client(kongtask_dsn) as client:
            assert len(await client.list_jobs(ids=[job.id])) == 1, "a refused POST acted"
        same = await http.post("/action", data={**fields, "csrf": token}, headers={"origin": url})
        assert same.status_code == 200, same.text
        assert "Complete: 1 of 1 job(s) changed" in same.text
        async with kongtask.open_client(kongtask_dsn) as client:
            assert await client.list_jobs(ids=[job.id]) == []
        # GETs never act: the confirmation page of an action changes nothing
        async with kongtask.open_client(kongtask_dsn) as client:
            kept = await client.add_job("kept", {})
        await http.get(f"/confirm?action=complete&id={kept.id}")
        async with kongtask.open_client(kongtask_dsn) as client:
            assert len(await client.list_jobs(ids=[kept.id])) == 1


async def test_read_only_mode_has_no_action(kongtask_dsn: str) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        job = await client.add_job("t", {}, job_key="k")
    async with (
        serving(kongtask_dsn, read_only=True) as (url, _),
        httpx.AsyncClient(base_url=url) as http,
    ):
        page = (await http.get(f"/jobs/{job.id}")).text
        assert "/confirm" not in page
        assert '<form method="post"' not in page
        assert "read-only" in page
        assert "/confirm" not in (await http.get("/jobs")).text
        assert (await http.get(f"/confirm?action=complete&id={job.id}")).status_code == 403
        token = http.cookies["kongtask_csrf"]
        posted = await http.post(
            "/action", data={"action": "complete", "id": str(job.id), "csrf": token}
        )
        assert posted.status_code == 403
    async with kongtask.open_client(kongtask_dsn) as client:
        assert len(await client.list_jobs(ids=[job.id])) == 1


async def test_each_action_changes_the_job(kongtask_dsn: str) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        dead = await client.add_job("t", {}, max_attempts=1)
        await client.permanently_fail_jobs([dead.id], "boom")
        later = await client.add_job("t", {})
        doomed = await client.add_job("t", {})
        keyed = await client.add_job("t", {}, job_key="the-key")
        async with serving(kongtask_dsn) as (url, _), httpx.AsyncClient(base_url=url) as http:
            retried = await confirm_and_post(http, f"action=retry&id={dead.id}")
            assert "1 of 1" in retried.text
            (info,) = await client.list_jobs(ids=[dead.id])
            assert info.state == "ready"
            assert info.job.attempts == 0

            when = (datetime.now(UTC) + timedelta(days=2)).replace(second=0, microsecond=0)
            await confirm_and_post(
                http,
                f"action=reschedule&id={later.id}",
                run_at=when.strftime("%Y-%m-%dT%H:%M"),
            )
            (info,) = await client.list_jobs(ids=[later.id])
            assert info.job.run_at == when
            assert info.state == "scheduled"

            await confirm_and_post(http, f"action=fail&id={doomed.id}", message=f"by hand {XSS}")
            (info,) = await client.list_jobs(ids=[doomed.id])
            assert info.state == "permanently_failed"
            assert info.job.last_error == f"by hand {XSS}"

            await confirm_and_post(http, f"action=remove&id={keyed.id}")
            assert await client.list_jobs(ids=[keyed.id]) == []

            bad = await http.get(f"/confirm?action=remove&id={later.id}")
            assert bad.status_code == 200  # the page exists; the POST refuses a keyless job
            refused = await confirm_and_post(http, f"action=remove&id={later.id}")
            assert refused.status_code == 400
            assert len(await client.list_jobs(ids=[later.id])) == 1


async def test_bulk_actions_apply_to_the_filter_up_to_the_listed_id(kongtask_dsn: str) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        mine = [await client.add_job("bulk_me", {"n": n}) for n in range(3)]
        other = await client.add_job("other", {})
        async with serving(kongtask_dsn) as (url, _), httpx.AsyncClient(base_url=url) as http:
            listing = (await http.get("/jobs", params={"task": "bulk_me"})).text
            links = dict(
                re.findall(r'class="bulk" href="/confirm\?action=(\w+)&amp;([^"]*)"', listing)
            )
            assert sorted(links) == ["complete", "fail", "remove", "reschedule", "retry"]
            query = links["fail"].replace("&amp;", "&")
            assert f"max_id={mine[-1].id}" in query
            newer = await client.add_job("bulk_me", {"n": "added after the page"})
            page = await http.get(f"/confirm?action=fail&{query}")
            assert "(3 job(s) now)" in page.text
            done = await confirm_and_post(http, f"action=fail&{query}", message="bulk")
            assert "3 of 3" in done.text
            states = {i.job.id: i.state for i in await client.list_jobs()}
            assert all(states[j.id] == "permanently_failed" for j in mine)
            assert states[other.id] == "ready"
            assert states[newer.id] == "ready"

            failed = f"task=bulk_me&state=permanently_failed&max_id={newer.id}"
            done = await confirm_and_post(http, f"action=retry&{failed}")
            assert "3 of 3" in done.text
            infos = await client.list_jobs(tasks="bulk_me")
            assert [(i.state, i.job.attempts) for i in infos] == [("ready", 0)] * 4

            when = (datetime.now(UTC) + timedelta(days=2)).replace(second=0, microsecond=0)
            mine_only = f"task=bulk_me&max_id={mine[-1].id}"
            await confirm_and_post(
                http, f"action=reschedule&{mine_only}", run_at=when.strftime("%Y-%m-%dT%H:%M")
            )
            infos = await client.list_jobs(tasks="bulk_me")
            assert [i.job.run_at == when for i in infos] == [True, True, True, False]

            keyed = await client.add_job("bulk_keyed", {}, job_key="k1")
            await client.add_job("bulk_keyed", {})
            keyed_filter = f"task=bulk_keyed&max_id={keyed.id + 1}"
            page = await http.get(f"/confirm?action=remove&{keyed_filter}")
            assert "(1 job(s) now), jobs without a key are left alone" in page.text
            done = await confirm_and_post(http, f"action=remove&{keyed_filter}")
            assert "1 of 2 job(s) changed" in done.text
            assert [i.job.key for i in await client.list_jobs(tasks="bulk_keyed")] == [None]

            done = await confirm_and_post(http, f"action=complete&{mine_only}")
            assert "3 of 3" in done.text
            assert [i.job.id for i in await client.list_jobs(tasks="bulk_me")] == [newer.id]
            # a bulk action needs the listed id it stops at
            assert (await http.get("/confirm?action=fail&task=bulk_me")).status_code == 400


async def test_bulk_actions_are_refused_in_read_only_mode(kongtask_dsn: str) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        job = await client.add_job("bulk_me", {})
        async with (
            serving(kongtask_dsn, read_only=True) as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            listing = await http.get("/jobs", params={"task": "bulk_me"})
            assert str(job.id) in listing.text
            assert 'class="bulk"' not in listing.text
            query = f"action=complete&task=bulk_me&max_id={job.id}"
            assert (await http.get(f"/confirm?{query}")).status_code == 403
            cookie = listing.cookies.get("kongtask_csrf") or "x" * 43
            http.cookies.set("kongtask_csrf", cookie)
            posted = await http.post(
                "/action",
                data={"csrf": cookie, "action": "complete", "task": "bulk_me", "max_id": job.id},
            )
            assert posted.status_code == 403
            assert len(await client.list_jobs(ids=[job.id])) == 1


async def test_unlock_releases_a_dead_pools_jobs(kongtask_dsn: str) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        job = await client.add_job("t", {})
        await client._db.execute(
            "update graphile_worker._private_jobs set locked_by = 'pool-deadbeef', "
            "locked_at = now(), attempts = 1 where id = $1",
            job.id,
        )
        async with serving(kongtask_dsn) as (url, _), httpx.AsyncClient(base_url=url) as http:
            pools = (await http.get("/pools")).text
            assert "pool-deadbeef" in pools
            assert "action=unlock&amp;pool=pool-deadbeef" in pools
            await confirm_and_post(http, "action=unlock&pool=pool-deadbeef")
            (info,) = await client.list_jobs(ids=[job.id])
            assert info.job.locked_by is None
            assert info.state != "running"


async def read_until(stream: trio.SocketStream, seen: bytearray, marker: bytes) -> None:
    with trio.fail_after(10):
        while marker not in seen:
            chunk = await stream.receive_some()
            assert chunk, f"the stream closed before {marker!r}"
            seen += chunk


async def test_the_event_stream_reports_inserts(kongtask_dsn: str) -> None:
    # a raw socket: the stream never ends, and httpx's nested generators would leak
    async with serving(kongtask_dsn) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            request = b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            await stream.send_all(request)
            seen = bytearray()
            await read_until(stream, seen, b"retry: 2000\n\n")
            assert b"content-type: text/event-stream" in seen.lower()
            assert b"data: insert" not in seen
            async with kongtask.open_client(kongtask_dsn) as client:
                await client.add_job("t", {})
            await read_until(stream, seen, b"data: insert")
            assert app.statistics().event_streams == 1
        # the closed connection ends the stream
        await wait_until(lambda: app.statistics().event_streams == 0)


async def open_event_stream(url: str) -> tuple[trio.SocketStream, bytearray]:
    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    seen = bytearray()
    await read_until(stream, seen, b"retry: 2000\n\n")
    return stream, seen


LISTENING_BACKENDS = """
select count(*) from pg_catalog.pg_stat_activity
where datname = pg_catalog.current_database() and query ilike 'listen %'"""


async def test_live_pages_share_one_listen_connection(kongtask_dsn: str) -> None:
    async with (
        serving(kongtask_dsn) as (url, app),
        kongtask.open_client(kongtask_dsn) as client,
    ):
        assert app.statistics().listening
        streams = [await open_event_stream(url) for _ in range(3)]
        assert app.statistics().event_streams == 3
        assert await client._db.fetchval(LISTENING_BACKENDS) == 1
        await client.add_job("t", {})
        for stream, seen in streams:
            await read_until(stream, seen, b"data: insert")
        for stream, _ in streams:
            await stream.aclose()
        await wait_until(lambda: app.statistics().event_streams == 0)
        assert await client._db.fetchval(LISTENING_BACKENDS) == 1


async def test_the_overview_and_pools_never_wait_for_their_reads(kongtask_dsn: str) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        await client.add_job("counted_before", {})
        async with serving(kongtask_dsn) as (url, app), httpx.AsyncClient(base_url=url) as http:
            app.overview_max_age = 0.1
            assert "counted_before" in (await http.get("/")).text
            locker = await client._db.connect()
            try:
                # counting the jobs table now blocks until this transaction ends
                await client._db.run(locker.execute, "begin")
                await client._db.run(
                    locker.execute,
                    "lock table graphile_worker._private_jobs in access exclusive mode",
                )
                await client._db.run(
                    locker.execute,
                    "select graphile_worker.add_job('added_while_locked', '{}'::json)",
                )
                await wait_until(lambda: (app.statistics().overview_age or 0) > 1)
                with trio.fail_after(5):
                    page = await http.get("/")
                assert page.status_code == 200
                assert "counted_before" in page.text
                assert "added_while_locked" not in page.text
                await wait_until(lambda: (app.statistics().pools_age or 0) > 1)
                with trio.fail_after(5):
                    assert (await http.get("/pools")).status_code == 200
                await client._db.run(locker.execute, "commit")
            finally:
                await client._db.close_connection(locker)

            async def counted() -> bool:
                return "added_while_locked" in (await http.get("/")).text

            await wait_until(counted)


async def test_non_loopback_bind_needs_authentication(
    kongtask_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("USER", "PASSWORD", "TOKEN"):
        monkeypatch.delenv(f"KONGTASK_DASHBOARD_{name}", raising=False)
    with pytest.raises(SystemExit) as exited:
        await kongtask.main(["dashboard", "-c", kongtask_dsn, "--host", "0.0.0.0"])
    assert exited.value.code == 1
    assert "without authentication" in capsys.readouterr().err
    from kongtask._cli_dashboard import is_loopback

    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("10.0.0.1")


async def test_the_overview_charts_failures_from_the_database(kongtask_dsn: str) -> None:
    async def flaky(job: kongtask.Job, ctx: kongtask.JobContext) -> None:
        raise RuntimeError("nope")

    async with kongtask.open_client(kongtask_dsn) as client:
        job = await client.add_job("flaky", {}, max_attempts=5)
        # failed by hand, its run_at two hours ahead: placed there, so not in the past hour
        later = await client.add_job(
            "t", {}, run_at=datetime.now(UTC) + timedelta(hours=2), max_attempts=1
        )
        await client.permanently_fail_jobs([later.id], "by hand")

        async def failed_once() -> bool:
            (info,) = await client.list_jobs(ids=[job.id])
            return info.job.last_error is not None

        async with kongtask.open_worker(kongtask_dsn, {"flaky": flaky}, poll_interval=0.2):
            await wait_until(failed_once, 15)
    async with serving(kongtask_dsn) as (url, _), httpx.AsyncClient(base_url=url) as http:
        page = (await http.get("/")).text
        assert "1 failure(s) in the hour" in page
        bars = re.findall(r"<title>(\d+) failure\(s\) (\d+) min ago</title>", page)
        assert len(bars) == 1
        assert bars[0][0] == "1"
        assert bars[0][1] in {"0", "1"}


async def test_the_cli_verb_serves_the_dashboard(kongtask_dsn: str) -> None:
    import subprocess
    import sys

    code = "import kongtask._cli as cli; cli.run_cli()"
    args = [sys.executable, "-c", code, "dashboard", "-c", kongtask_dsn, "--port", "0"]
    process = await trio.lowlevel.open_process(args, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        seen = b""
        with trio.fail_after(20):
            while b"kongtask dashboard on http://127.0.0.1:" not in seen or b"\n" not in seen:
                chunk = await process.stdout.receive_some()
                assert chunk, "the dashboard exited before serving"
                seen += chunk
        url = seen.decode().split("kongtask dashboard on ", 1)[1].split()[0]
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.get("/")
        assert response.status_code == 200
        assert response.headers["content-security-policy"] == CSP
    finally:
        process.terminate()
        await process.wait()


async def test_mounted_under_a_prefix_its_links_and_cookie_stay_there(kongtask_dsn: str) -> None:
    async with kongtask.open_client(kongtask_dsn) as client:
        job = await client.add_job("t", {})
        app = kongtask.DashboardApp(client)
        transport = httpx.ASGITransport(app=app, root_path="/queue")
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            page = await http.get("/queue/jobs")
            assert page.status_code == 200
            assert f'href="/queue/jobs/{job.id}"' in page.text
            assert 'href="/queue/static/dashboard.css"' in page.text
            assert "Path=/queue;" in page.headers["set-cookie"]
            assert (await http.get(f"/queue/jobs/{job.id}")).status_code == 200
