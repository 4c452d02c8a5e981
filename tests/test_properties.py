"""Property tests of pure parts: crontab patterns, JSON formatting, claim sizing.

Hypothesis runs in two tiers (profiles registered in conftest.py): derandomized by
default, with a fresh printed seed under ``--hypothesis-profile=ci``. Health checks are on.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

from hypothesis import given, strategies as st

from kongtask._cron import _parse_pattern, js_json
from kongtask._worker._claim_sizing import ClaimSizer
from kongtask._worker._timing import WorkerTiming

FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("dow", 0, 6))


@st.composite
def field_text(draw: st.DrawFn, low: int, high: int) -> tuple[str, frozenset[int]]:
    """A cron field and the values it stands for, built independently of the parser."""
    kind = draw(st.sampled_from(("star", "step", "list", "range")))
    if kind == "star":
        return "*", frozenset(range(low, high + 1))
    if kind == "step":
        step = draw(st.integers(1, high - low + 1))
        return f"*/{step}", frozenset(range(low, high + 1, step))
    if kind == "list":
        values = draw(st.lists(st.integers(low, high), min_size=1, max_size=4, unique=True))
        return ",".join(map(str, values)), frozenset(values)
    a = draw(st.integers(low, high - 1))
    b = draw(st.integers(a + 1, high))
    return f"{a}-{b}", frozenset(range(a, b + 1))


@st.composite
def patterns(draw: st.DrawFn) -> tuple[str, list[frozenset[int]]]:
    parts = [draw(field_text(low, high)) for _, low, high in FIELDS]
    return " ".join(text for text, _ in parts), [values for _, values in parts]


def brute_force(sets: list[frozenset[int]], t: datetime) -> bool:
    minutes, hours, days, months, weekdays = sets
    if t.minute not in minutes or t.hour not in hours or t.month not in months:
        return False
    dom, dow = t.day in days, (t.weekday() + 1) % 7 in weekdays
    dom_any, dow_any = len(days) == 31, len(weekdays) == 7
    if not dom_any and not dow_any:
        return dom or dow  # both restricted: either (cron's rule)
    return dom and dow


@given(patterns(), st.datetimes(datetime(2020, 1, 1), datetime(2040, 1, 1)))
def test_pattern_matching_agrees_with_a_brute_force_minute_check(
    pattern: tuple[str, list[frozenset[int]]], when: datetime
) -> None:
    text, sets = pattern
    parsed = _parse_pattern(text)
    assert [parsed.minutes, parsed.hours, parsed.days, parsed.months, parsed.weekdays] == sets
    t = when.replace(second=0, microsecond=0, tzinfo=UTC)
    for minute in range(0, 24 * 60, 7):  # a day of minutes, sampled
        at = t + timedelta(minutes=minute)
        assert parsed.matches(at) == brute_force(sets, at), (text, at)


@given(patterns())
def test_a_pattern_reparsed_from_its_own_sets_is_the_same(
    pattern: tuple[str, list[frozenset[int]]],
) -> None:
    text, _ = pattern
    parsed = _parse_pattern(text)
    fields = [parsed.minutes, parsed.hours, parsed.days, parsed.months, parsed.weekdays]
    again = _parse_pattern(" ".join(",".join(map(str, sorted(f))) for f in fields))
    assert again == parsed


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, int | float)
            and isinstance(b, int | float)
            and math.isclose(a, b, rel_tol=0, abs_tol=0)
        ) or a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@given(json_values)
def test_js_json_round_trips_through_a_json_parser(value: object) -> None:
    text = js_json(value)
    assert _same(json.loads(text), value), text
    assert "\\n" not in text or "\n" not in text  # one line, like JSON.stringify


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_js_numbers_read_back_exactly(x: float) -> None:
    assert float(js_json(x)) == x or (x == 0 and js_json(x) == "0")


@given(
    concurrency=st.integers(1, 64),
    batch_size=st.integers(1, 2000),
    running=st.integers(0, 64),
    local=st.integers(0, 2000),
    jobs_per_second=st.integers(0, 10**6),
)
def test_claim_size_never_overfills_and_never_starves(
    concurrency: int, batch_size: int, running: int, local: int, jobs_per_second: int
) -> None:
    """Whatever the load: a claim takes at most batch_size, the pool holds at most its
    concurrency plus 0.1 s of work at the observed rate, and an idle slot with nothing
    queued locally always gets a claim."""
    running = min(running, concurrency)
    lookahead = WorkerTiming().prefetch_lookahead
    sizer = ClaimSizer(concurrency, batch_size, lookahead=lookahead)
    # a second after the start: this rate
    size = sizer.size(
        1.0,
        started=jobs_per_second,
        in_flight=running + local,
        idle_worker_waits=running < concurrency and local == 0,
    )
    prefetch = min(batch_size, int(jobs_per_second * lookahead))
    assert 0 <= size <= batch_size
    assert size == 0 or running + local + size <= concurrency + prefetch
    if running < concurrency and local == 0:
        assert size >= 1
