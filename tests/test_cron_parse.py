"""Crontab parsing and matching (docs/cron.md), the job payload, and DST behaviour.

Pure functions: no database, no clock. Cases are our own; graphile-worker's test names
served only as a checklist of categories.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import kongtask
from kongtask import CronItem, CrontabError, crontab
from kongtask._cron import format_fill, format_ts, js_json, parse_fill


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def one(line: str) -> CronItem:
    items = crontab(line)
    assert len(items) == 1
    return items[0]


MONDAY_10H = datetime(2026, 1, 5, 10, tzinfo=UTC)
MONDAY = datetime(2026, 1, 5, tzinfo=UTC)


def minutes_of_hour(item: CronItem, hour: datetime = MONDAY_10H) -> list[int]:
    """Which minutes of ``hour`` the item matches."""
    return [m for m in range(60) if item.matches(hour + timedelta(minutes=m))]


def hours_of_day(item: CronItem, day: datetime = MONDAY) -> list[int]:
    return [
        h
        for h in range(24)
        if any(item.matches(day + timedelta(hours=h, minutes=m)) for m in range(60))
    ]


def days_of_jan_2026(item: CronItem) -> list[int]:
    """Days of January 2026 (which starts on a Thursday) on which the item runs."""
    return [
        d
        for d in range(1, 32)
        if any(item.matches(utc(2026, 1, d, h, m)) for h in range(24) for m in range(60))
    ]


# --- the public surface -----------------------------------------------------------------


def test_public_names() -> None:
    assert kongtask.crontab is crontab
    assert kongtask.CronItem is CronItem
    assert issubclass(CrontabError, kongtask.ConfigError)
    assert repr(CronItem).startswith("<class 'kongtask.CronItem'")


def test_comments_blank_lines_and_whitespace_are_skipped() -> None:
    text = "\n# a comment\n   # indented comment\n\t\n  */5 * * * * a  \n\n0 0 * * * b\n"
    items = crontab(text)
    assert [i.task for i in items] == ["a", "b"]
    assert crontab("") == []
    assert crontab("# only\n\n") == []


def test_tabs_and_multiple_spaces_separate_fields() -> None:
    item = one("0\t4  *   *\t* \t task")
    assert item.task == "task"
    assert minutes_of_hour(item, utc(2026, 1, 5, 4)) == [0]
    assert hours_of_day(item) == [4]


# --- time fields ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "minutes"),
    [
        ("*", list(range(60))),
        ("7", [7]),
        ("07", [7]),
        ("*/15", [0, 15, 30, 45]),
        ("*/1", list(range(60))),
        ("*/45", [0, 45]),
        ("*/60", [0]),
        ("10-13", [10, 11, 12, 13]),
        ("1,5,59", [1, 5, 59]),
        ("58-59,0-1,*/20", [0, 1, 20, 40, 58, 59]),
        ("5,5,5", [5]),
    ],
)
def test_minute_field_forms(field: str, minutes: list[int]) -> None:
    assert minutes_of_hour(one(f"{field} * * * * t")) == minutes


def test_hour_field() -> None:
    assert hours_of_day(one("0 */6 * * * t")) == [0, 6, 12, 18]
    assert hours_of_day(one("0 22-23,0 * * * t")) == [0, 22, 23]


def test_day_of_month_and_month() -> None:
    assert days_of_jan_2026(one("0 0 1,15 * * t")) == [1, 15]
    assert days_of_jan_2026(one("0 0 */10 * * t")) == [1, 11, 21, 31]  # steps start at 1
    feb_only = one("0 0 * 2 * t")
    assert days_of_jan_2026(feb_only) == []
    assert feb_only.matches(utc(2026, 2, 10))
    assert one("0 0 * */3 * t").matches(utc(2026, 10, 1))  # months 1, 4, 7, 10
    assert not one("0 0 * */3 * t").matches(utc(2026, 11, 1))


def test_day_of_week_sunday_is_0_and_7() -> None:
    # January 2026: the 4th, 11th, 18th, 25th are Sundays; the 3rd is a Saturday.
    sundays = [4, 11, 18, 25]
    assert days_of_jan_2026(one("0 0 * * 0 t")) == sundays
    assert days_of_jan_2026(one("0 0 * * 7 t")) == sundays
    weekend = days_of_jan_2026(one("0 0 * * 6-7 t"))
    assert weekend == sorted([*sundays, 3, 10, 17, 24, 31])
    assert days_of_jan_2026(one("0 0 * * 1-5 t")) == [
        d for d in range(1, 32) if utc(2026, 1, d).weekday() < 5
    ]


def test_day_of_month_or_day_of_week_when_both_restricted() -> None:
    # Both restricted: either matches (the 13th, or any Friday).
    days = days_of_jan_2026(one("0 0 13 * 5 t"))
    assert days == [2, 9, 13, 16, 23, 30]


def test_only_one_day_field_restricted_must_match() -> None:
    assert days_of_jan_2026(one("0 0 13 * * t")) == [13]
    assert days_of_jan_2026(one("0 0 * * 5 t")) == [2, 9, 16, 23, 30]


@pytest.mark.parametrize("dom", ["*/1", "1-31", "*"])
def test_full_day_of_month_counts_as_unrestricted(dom: str) -> None:
    # DOM covers all 31 values, so only the (restricted) day of week decides.
    assert days_of_jan_2026(one(f"0 0 {dom} * 5 t")) == [2, 9, 16, 23, 30]


@pytest.mark.parametrize("dow", ["*/1", "0-6", "1-7", "0-7"])
def test_full_day_of_week_counts_as_unrestricted(dow: str) -> None:
    assert days_of_jan_2026(one(f"0 0 13 * {dow} t")) == [13]


def test_matching_is_in_utc() -> None:
    item = one("0 4 * * * t")
    berlin_5am = datetime.fromisoformat("2026-01-31T05:00:00+01:00")
    assert item.matches(berlin_5am)  # 04:00 UTC
    assert not item.matches(datetime.fromisoformat("2026-01-31T04:00:00+01:00"))


# --- task, options, payload -----------------------------------------------------------------


@pytest.mark.parametrize(
    "task", ["a", "_x", "send-email", "Mail:send", "nested/task_1", "a/b/c:d-e"]
)
def test_task_identifiers(task: str) -> None:
    item = one(f"* * * * * {task}")
    assert item.task == task
    assert item.identifier == task


def test_defaults_without_options() -> None:
    item = one("* * * * * t")
    assert item.payload is None
    assert item.fill == timedelta(0)
    assert (item.max_attempts, item.queue_name, item.priority) == (None, None, None)
    assert (item.job_key, item.job_key_mode, item.effective_job_key_mode) == (None, None, None)


def test_all_options() -> None:
    item = one(
        "0 4 * * * t ?id=my-id_2&fill=1w2d3h4m5s&max=3&queue=q:a-b_c&priority=-7"
        "&jobKey=k%2Fone+two&jobKeyMode=preserve_run_at"
    )
    assert item.identifier == "my-id_2"
    assert item.fill == timedelta(weeks=1, days=2, hours=3, minutes=4, seconds=5)
    assert item.max_attempts == 3
    assert item.queue_name == "q:a-b_c"
    assert item.priority == -7
    assert item.job_key == "k/one two"  # URL-decoded like URLSearchParams: %2F and '+'
    assert item.job_key_mode == "preserve_run_at"


def test_job_key_mode_defaults_to_replace_with_a_job_key() -> None:
    assert one("* * * * * t ?jobKey=k").effective_job_key_mode == "replace"
    assert one("* * * * * t ?jobKey=k&jobKeyMode=replace").effective_job_key_mode == "replace"


@pytest.mark.parametrize(
    ("fill", "seconds"),
    [("30s", 30), ("1m", 60), ("2h", 7200), ("1d", 86400), ("1w", 604800), ("1h30m", 5400)],
)
def test_fill_units(fill: str, seconds: int) -> None:
    assert parse_fill(fill) == timedelta(seconds=seconds)
    assert format_fill(parse_fill(fill)) == fill
    assert one(f"* * * * * t ?fill={fill}").fill == timedelta(seconds=seconds)


def test_json5_payload() -> None:
    item = one(
        "* * * * * t ?max=2 {unquoted: 'single', trailing: [1, 2,], hex: 0x10, /* c */ n: null}"
    )
    assert item.payload == {"unquoted": "single", "trailing": [1, 2], "hex": 16, "n": None}
    assert one('* * * * * t {"a": {"b": "c d"}}').payload == {"a": {"b": "c d"}}
    assert one("* * * * * t {}").payload == {}


def test_payload_runs_to_end_of_line_and_may_follow_the_task_directly() -> None:
    assert one("* * * * * t {a: 'x y  z'}").payload == {"a": "x y  z"}


def test_identifiers_must_be_unique_but_id_tells_lines_apart() -> None:
    items = crontab("* * * * * t\n0 * * * * t ?id=t_hourly\n")
    assert [i.identifier for i in items] == ["t", "t_hourly"]
    with pytest.raises(CrontabError) as info:
        crontab("* * * * * t\n\n0 * * * * t\n")
    assert info.value.line == 3
    assert "duplicate cron identifier 't' (first used on line 1)" in str(info.value)


# --- malformed lines ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "column", "expected"),
    [
        ("* * * *", 8, "line ends early: expected the day of week field"),
        ("* * * * *", 10, "expected the task identifier field"),
        ("60 * * * * t", 1, "minute 60 is out of range: expected 0-59"),
        ("* 24 * * * t", 3, "hour 24 is out of range: expected 0-23"),
        ("* * 0 * * t", 5, "day of month 0 is out of range: expected 1-31"),
        ("* * 32 * * t", 5, "day of month 32 is out of range"),
        ("* * * 13 * t", 7, "month 13 is out of range: expected 1-12"),
        ("* * * 0 * t", 7, "month 0 is out of range"),
        ("* * * * 8 t", 9, "day of week 8 is out of range: expected 0-7 (7 is Sunday, like 0)"),
        ("1-70 * * * * t", 3, "minute 70 is out of range"),
        ("5-5 * * * * t", 1, "expected 'a-b' with b greater than a"),
        ("9-3 * * * * t", 1, "expected 'a-b' with b greater than a"),
        ("*/0 * * * * t", 3, "expected '*/n' with n >= 1"),
        ("0-30/5 * * * * t", 1, "steps on ranges ('a-b/n') are not supported"),
        ("*/ * * * * t", 1, "expected a number, 'a-b', '*' or '*/n'"),
        ("1,,2 * * * * t", 3, "empty entry in the minute field"),
        ("1, * * * * t", 3, "empty entry in the minute field"),
        ("* * * JAN * t", 7, "unexpected 'J' in the month field"),
        ("* * * * MON t", 9, "names such as MON or JAN are not supported"),
        ("@daily t", 1, "'@' shortcuts such as @daily are not supported"),
        ("* * L * * t", 5, "unexpected 'L' in the day of month field"),
        ("* * ? * * t", 5, "unexpected '?' in the day of month field"),
        ("* * * * * 9lives", 11, "invalid task identifier '9lives'"),
        ("* * * * * a.b", 11, "invalid task identifier 'a.b'"),
        ("* * * * * t extra", 13, "unexpected 'extra': expected '?options' or a JSON5 payload"),
        ("* * * * * t ?", 13, "expected options after '?'"),
        ("* * * * * t ?x=1", 14, "unknown option 'x': expected one of id, fill, max, queue"),
        ("* * * * * t ?max=1&max=2", 20, "option 'max' is given more than once"),
        ("* * * * * t ?fill=1y", 19, "invalid fill value '1y': expected a duration"),
        ("* * * * * t ?fill=", 19, "invalid fill value ''"),
        ("* * * * * t ?max=0", 18, "invalid max value '0': expected an integer from 1 to 32767"),
        ("* * * * * t ?max=-1", 18, "invalid max value '-1'"),
        ("* * * * * t ?max=40000", 18, "invalid max value '40000'"),
        ("* * * * * t ?priority=x", 23, "invalid priority value 'x'"),
        ("* * * * * t ?priority=99999", 23, "from -32768 to 32767"),
        ("* * * * * t ?queue=a%20b", 20, "invalid queue value 'a b'"),
        ("* * * * * t ?id=1x", 17, "invalid id value '1x'"),
        ("* * * * * t ?id=a:b", 17, "invalid id value 'a:b'"),
        ("* * * * * t ?jobKeyMode=unsafe_dedupe", 25, "expected 'replace' or 'preserve_run_at'"),
        ("* * * * * t ?jobKey=", 21, "invalid jobKey value ''"),
        ("* * * * * t ?tz=UTC", 14, "unknown option 'tz'"),
        ("* * * * * t {a:}", 16, "invalid JSON5 payload"),
        ("* * * * * t {a: 1", 18, "invalid JSON5 payload"),
        ("* * * * * t {a: 1} {b: 2}", 20, "invalid JSON5 payload"),
        ("* * * * * t {a: 1} ?max=1", 20, "invalid JSON5 payload"),
        ("* * * * * t [1, 2]", 13, "expected '?options' or a JSON5 payload object"),
        ("* * * * * t ?max=1 ?fill=1h", 20, "expected '?options' or a JSON5 payload"),
    ],
)
def test_malformed_lines_name_line_column_and_expectation(
    line: str, column: int, expected: str
) -> None:
    text = "# header\n\n" + line + "\n"
    with pytest.raises(CrontabError) as info:
        crontab(text)
    err = info.value
    assert err.line == 3
    assert err.column == column, str(err)
    assert expected in str(err)
    assert str(err).startswith(f"crontab line 3, column {column}: ")


def test_column_counts_from_the_untrimmed_line() -> None:
    with pytest.raises(CrontabError) as info:
        crontab("   61 * * * * t")
    assert info.value.column == 4


def test_load_crontab_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "crontab"
    path.write_text("# jobs\n*/5 * * * * digest ?fill=1h {all: true}\n")
    items = kongtask.load_crontab_file(path)
    assert [(i.task, i.payload) for i in items] == [("digest", {"all": True})]
    path.write_text("* * * * * ok\n* * * * * bad ?fill=soon\n")
    with pytest.raises(CrontabError) as info:
        kongtask.load_crontab_file(path)
    assert str(info.value).startswith(f"crontab {path}, line 2, column 21: invalid fill value")


# --- CronItem in code ---------------------------------------------------------------------


def test_cron_item_in_code_equals_parsed_line() -> None:
    parsed = one("*/5 * * * * send_digest ?fill=1h&max=4 {all: true}")
    built = CronItem(
        "*/5 * * * *", "send_digest", payload={"all": True}, fill=timedelta(hours=1), max_attempts=4
    )
    assert parsed == built


def test_predicate_match_gets_the_minute() -> None:
    seen: list[datetime] = []

    def on_even_hours(t: datetime) -> bool:
        seen.append(t)
        return t.hour % 2 == 0 and t.minute == 0

    item = CronItem(on_even_hours, "t")
    assert item.matches(utc(2026, 1, 1, 2))
    assert not item.matches(utc(2026, 1, 1, 3))
    assert seen[0] == utc(2026, 1, 1, 2)
    assert seen[0].tzinfo is not None
    assert item.next_runs(utc(2026, 1, 1, 2, 30), 2) == [utc(2026, 1, 1, 4), utc(2026, 1, 1, 6)]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"match": "* * * *"}, "expected 5 time fields"),
        ({"match": "* * * * * *"}, "after the five time fields"),
        ({"match": "61 * * * *"}, "minute 61 is out of range"),
        ({"match": 5}, "match must be a pattern string or a callable"),
        ({"task": "1bad"}, "invalid task identifier"),
        ({"task": "t" * 129}, "expected at most 128"),
        ({"identifier": "has space"}, "invalid cron identifier"),
        ({"payload": [1, 2]}, "payload must be a JSON object"),
        ({"payload": {"s": {1, 2}}}, "payload is not JSON-serialisable"),
        ({"payload": {1: "x"}}, "keys must be strings"),
        ({"fill": timedelta(seconds=-1)}, "expected a timedelta of zero or more"),
        ({"max_attempts": 0}, "max_attempts must be between 1 and 32767, not 0"),
        ({"max_attempts": True}, "max_attempts must be an integer, not bool"),
        ({"priority": 40000}, "priority must be between -32768 and 32767, not 40000"),
        ({"queue_name": "a b"}, "invalid queue name"),
        ({"job_key": ""}, "job_key '': expected a string of 1 to 512 characters"),
        ({"job_key_mode": "unsafe_dedupe"}, "cannot use 'unsafe_dedupe'"),
        ({"tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
    ],
)
def test_cron_item_validation(kwargs: dict[str, object], expected: str) -> None:
    args: dict[str, object] = {"match": "* * * * *", "task": "t", **kwargs}
    with pytest.raises(CrontabError, match=None) as info:
        CronItem(**args)  # type: ignore[arg-type]
    assert expected in str(info.value)


def test_pattern_errors_in_code_name_the_column_in_the_pattern() -> None:
    with pytest.raises(CrontabError) as info:
        CronItem("0 4 * * 9", "t")
    assert (info.value.line, info.value.column) == (None, 9)


# --- the job payload ------------------------------------------------------------------------------


def test_ts_formatted_like_javascript_to_iso_string() -> None:
    assert format_ts(utc(2026, 1, 31, 4)) == "2026-01-31T04:00:00.000Z"
    assert (
        format_ts(datetime.fromisoformat("2026-01-31T05:00:00.123456+01:00"))
        == "2026-01-31T04:00:00.123Z"
    )


def test_job_payload_adds_cron_key() -> None:
    ts = utc(2026, 1, 31, 4)
    assert one("* * * * * t").job_payload(ts, backfilled=False) == (
        '{"_cron":{"ts":"2026-01-31T04:00:00.000Z","backfilled":false}}'
    )
    assert one("* * * * * t {a: 1, b: 'x'}").job_payload(ts, backfilled=True) == (
        '{"a":1,"b":"x","_cron":{"ts":"2026-01-31T04:00:00.000Z","backfilled":true}}'
    )


def test_cron_key_wins_over_user_key_in_its_position() -> None:
    # Like the object spread in Node: the user's _cron key is replaced where it stands.
    text = one("* * * * * t {a: 1, _cron: 'mine', z: 2}").job_payload(
        utc(2026, 1, 31, 4), backfilled=False
    )
    assert text == '{"a":1,"_cron":{"ts":"2026-01-31T04:00:00.000Z","backfilled":false},"z":2}'


@pytest.mark.parametrize(
    ("value", "js"),
    [
        (1.0, "1"),
        (-0.0, "0"),
        (0.5, "0.5"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (123456789012345680000.0, "123456789012345680000"),
        (1e-6, "0.000001"),
        (1e-7, "1e-7"),
        (1.5e-10, "1.5e-10"),
        (-2.5e300, "-2.5e+300"),
        (float("inf"), "null"),
        (float("nan"), "null"),
        (2**53, "9007199254740992"),
        (12345678901234567890, "12345678901234567000"),
        ('é\u2028\t"\\\x01', '"é\u2028\\t\\"\\\\\\u0001"'),
        ("\ud800", '"\\ud800"'),
        ({"b": 1, "10": 2, "2": 3, "a": 4, "01": 5}, '{"2":3,"10":2,"b":1,"a":4,"01":5}'),
        ([True, False, None, []], "[true,false,null,[]]"),
    ],
)
def test_json_text_matches_javascript_json_stringify(value: object, js: str) -> None:
    assert js_json(value) == js


# --- next runs (used by `kongtask cron list`) -----------------------------------------------


def test_next_runs() -> None:
    item = one("30 4 * * 1 t")  # Mondays 04:30
    assert item.next_runs(utc(2026, 1, 5, 4, 30), 3) == [
        utc(2026, 1, 12, 4, 30),
        utc(2026, 1, 19, 4, 30),
        utc(2026, 1, 26, 4, 30),
    ]
    assert one("0 0 29 2 * t").next_runs(utc(2026, 3, 1), 1) == [utc(2028, 2, 29)]
    assert one("0 0 31 2 * t").next_runs(utc(2026, 3, 1), 1) == []  # never; returns quickly


# --- time zones (Python API only) ------------------------------------------------------------


def test_tz_matches_local_wall_clock_time() -> None:
    item = CronItem("0 9 * * *", "t", tz="Europe/Berlin")
    assert item.matches(utc(2026, 1, 15, 8))  # 09:00 CET
    assert item.matches(utc(2026, 7, 15, 7))  # 09:00 CEST
    assert not item.matches(utc(2026, 7, 15, 8))


def test_tz_skipped_local_minutes_do_not_run() -> None:
    # Europe/Berlin springs forward on 2026-03-29: 02:00 CET becomes 03:00 CEST, so
    # 02:30 local does not exist that day and a daily 02:30 job skips it.
    item = CronItem("30 2 * * *", "t", tz="Europe/Berlin")
    assert item.next_runs(utc(2026, 3, 27, 12), 3) == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST; nothing on the 29th
        utc(2026, 3, 31, 0, 30),
    ]


def test_tz_repeated_local_minutes_run_twice() -> None:
    # Europe/Berlin falls back on 2026-10-25: 03:00 CEST becomes 02:00 CET, so 02:30
    # local happens twice, at two UTC instants, and the job runs at both.
    item = CronItem("30 2 * * *", "t", tz="Europe/Berlin")
    assert item.next_runs(utc(2026, 10, 24, 12), 3) == [
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 1, 30),  # 02:30 CET
        utc(2026, 10, 26, 1, 30),
    ]


def test_tz_intervals_keep_real_time_spacing_across_dst() -> None:
    item = CronItem("*/30 * * * *", "t", tz="Europe/Berlin")
    runs = item.next_runs(utc(2026, 3, 28, 23, 59), 8)
    assert all(b - a == timedelta(minutes=30) for a, b in itertools.pairwise(runs))
    runs = item.next_runs(utc(2026, 10, 24, 23, 59), 8)
    assert all(b - a == timedelta(minutes=30) for a, b in itertools.pairwise(runs))


def test_tz_with_a_half_hour_offset() -> None:
    item = CronItem("0 0 * * *", "t", tz="Asia/Kolkata")  # UTC+05:30
    assert item.next_runs(utc(2026, 1, 1), 1) == [utc(2026, 1, 1, 18, 30)]
