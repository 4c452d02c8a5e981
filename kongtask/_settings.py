"""Where each CLI option's value comes from: flag > environment > config file > default.

Every configurable option has one key, used three ways: the TOML key (``[tool.kongtask]``
in ``./pyproject.toml``, or the top level of a ``--config FILE``), the environment
variable ``KONGTASK_`` + the key in capitals, and the namespace attribute the verbs read.
The flags are declared with ``default=SUPPRESS``, so an attribute that is present was
given on the command line. :func:`resolve_settings` fills in every other key from the
environment, the file or the default and records where each value came from
(``kongtask run --print-config`` shows it). A value that cannot be used raises
:class:`SettingsError` naming its source, before anything touches the database.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from ._config import DEFAULT_SCHEMA
from ._errors import ConfigError
from ._validate import validate_identifier

Kind = Literal["str", "int", "float", "bool", "list", "choice"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
ENV_PREFIX = "KONGTASK_"
CONFIG_ENV = "KONGTASK_CONFIG"
PYPROJECT = "pyproject.toml"


class SettingsError(ConfigError):
    """A flag, environment variable or config file value kongtask cannot use (exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Option:
    """One configurable option of the CLI."""

    key: str
    flags: tuple[str, ...]
    kind: Kind
    default: Any
    help: str
    metavar: str | None = None
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    # read after KONGTASK_<KEY>, before the file (graphile-worker's own variables)
    env_fallbacks: tuple[str, ...] = ()
    # a bool flag that sets False (``--no-prepared-statements``)
    negative_flag: bool = False
    # what the default means when it is not a plain value
    default_text: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def flag(self) -> str:
        return next(f for f in self.flags if f.startswith("--"))

    def describe_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.kind == "list":
            return "none"
        return str(self.default).lower() if self.kind == "bool" else str(self.default)


# The options every verb that talks to the database shares.
CONNECTION = Option(
    "connection",
    ("-c", "--connection"),
    "str",
    None,
    "PostgreSQL connection string",
    env_fallbacks=("DATABASE_URL",),
    default_text="libpq's PG* variables",
)
SCHEMA = Option(
    "schema",
    ("-s", "--schema"),
    "str",
    DEFAULT_SCHEMA,
    "schema name",
    env_fallbacks=("GRAPHILE_WORKER_SCHEMA",),
)
LOG_LEVEL = Option(
    "log_level", ("--log-level",), "choice", "INFO", "how much to log", choices=LOG_LEVELS
)
LOG_FORMAT = Option(
    "log_format",
    ("--log-format",),
    "choice",
    "text",
    "text lines, or one JSON object per line",
    choices=LOG_FORMATS,
)

RUN_OPTIONS: tuple[Option, ...] = (
    CONNECTION,
    SCHEMA,
    Option(
        "tasks",
        ("--tasks",),
        "list",
        [],
        "import the mapping identifier -> handler from MODULE (attribute `tasks`, or "
        "`TASKS`, unless ATTR is given); repeatable (comma-separated in the environment)",
        metavar="MODULE[:ATTR]",
    ),
    Option(
        "task_directory",
        ("--task-directory",),
        "str",
        None,
        "one Python file per task, exporting `task` or `handler`; the identifier is the "
        "path without .py (nested folders give a/b/c)",
        metavar="DIR",
        default_text="none",
    ),
    Option(
        "concurrency",
        ("-j", "--jobs", "--concurrency"),
        "int",
        1,
        "jobs running at once",
        metavar="N",
        minimum=1,
    ),
    Option(
        "poll_interval",
        ("--poll-interval",),
        "int",
        2000,
        "milliseconds between polls when no notification arrives (as graphile-worker)",
        metavar="MS",
        unit="ms",
        minimum=1,
    ),
    Option("once", ("--once",), "bool", False, "run until no job is ready, then exit 0"),
    Option("schema_only", ("--schema-only",), "bool", False, "migrate, then exit"),
    Option(
        "max_pool_size",
        ("-m", "--max-pool-size"),
        "int",
        10,
        "pooled database connections",
        metavar="N",
        minimum=1,
    ),
    Option(
        "prepared_statements",
        ("--no-prepared-statements",),
        "bool",
        True,
        "the flag disables prepared statements (for transaction-pooling pgBouncer)",
        negative_flag=True,
    ),
    Option(
        "forbidden_flags",
        ("--forbidden-flags",),
        "list",
        [],
        "skip jobs carrying any of these flags; repeatable",
        metavar="FLAG[,FLAG...]",
    ),
    Option(
        "crontab",
        ("--crontab",),
        "str",
        None,
        "schedule the crontab in FILE",
        metavar="FILE",
        default_text="./crontab if it exists",
    ),
    Option(
        "batch_size",
        ("--batch-size",),
        "int",
        1000,
        "most jobs claimed per statement",
        metavar="N",
        minimum=1,
    ),
    Option(
        "grace",
        ("--grace",),
        "float",
        5.0,
        "seconds running jobs may finish at shutdown before they are cancelled",
        metavar="SECONDS",
        unit="s",
        minimum=0,
    ),
    Option(
        "connect_timeout",
        ("--connect-timeout",),
        "float",
        60.0,
        "seconds to keep retrying (with backoff) while the database cannot be reached at "
        "start; 0 fails at once",
        metavar="SECONDS",
        unit="s",
        minimum=0,
    ),
    Option(
        "processes",
        ("--processes",),
        "int",
        1,
        "run N worker processes under a supervisor that restarts crashed ones "
        "(1: this process is the worker)",
        metavar="N",
        minimum=1,
    ),
    Option(
        "metrics_port",
        ("--metrics-port",),
        "int",
        None,
        "serve /healthz, /readyz and /metrics on PORT (0: any free port); see docs/operations.md",
        metavar="PORT",
        minimum=0,
        maximum=65535,
        default_text="off",
    ),
    Option(
        "metrics_host",
        ("--metrics-host",),
        "str",
        "0.0.0.0",
        "the address --metrics-port listens on",
        metavar="ADDR",
    ),
    Option(
        "tracing",
        ("--tracing",),
        "bool",
        False,
        "OpenTelemetry spans per job run and per ctx.add_job (kongtask[tracing]; configure "
        "an SDK, e.g. with opentelemetry-instrument)",
    ),
    Option(
        "propagate_trace_context",
        ("--propagate-trace-context",),
        "bool",
        False,
        "ctx.add_job stores the trace context in object payloads (key _kongtask_trace), so "
        "the new job's span continues the trace; implies --tracing",
    ),
    LOG_LEVEL,
    LOG_FORMAT,
)

OPTIONS_BY_KEY = {option.key: option for option in RUN_OPTIONS}
COMMON_KEYS = ("connection", "schema", "log_level", "log_format")
LOG_KEYS = ("log_level", "log_format")


# ---------------------------------------------------------------------------
# argparse


#: How a verb module gets the connection options (``-c``, ``-s``, ``--config``, logging)
#: added to its parsers, without importing the module that defines them.
AddConnectionOptions = Callable[[argparse.ArgumentParser], None]


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format``: on the main parser and on every verb."""
    for option in (LOG_LEVEL, LOG_FORMAT):
        add_option(parser, option)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"read options from this TOML file (default: [tool.kongtask] in ./{PYPROJECT} "
        f"when present; ${CONFIG_ENV})",
    )


def add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    """Declare ``option``'s flags on ``parser`` (absent from the namespace unless given)."""
    where = f"${option.env}"
    for name in option.env_fallbacks:
        where += f", ${name}"
    where += f", TOML {option.key}"
    help_text = f"{option.help} (default: {option.describe_default()}; {where})"
    help_text = help_text.replace("%", "%%")
    common: dict[str, Any] = {"dest": option.key, "default": argparse.SUPPRESS, "help": help_text}
    if option.kind == "bool":
        action = "store_false" if option.negative_flag else "store_true"
        parser.add_argument(*option.flags, action=action, **common)
    elif option.kind == "list":
        parser.add_argument(*option.flags, action="append", metavar=option.metavar, **common)
    elif option.kind == "choice":
        parser.add_argument(
            *option.flags,
            type=str.upper if option.key == "log_level" else str.lower,
            choices=option.choices,
            **common,
        )
    else:
        parse = {"int": int, "float": float, "str": str}[option.kind]
        parser.add_argument(*option.flags, type=parse, metavar=option.metavar, **common)


# ---------------------------------------------------------------------------
# resolution


@dataclass(frozen=True)
class Settings:
    """Resolved values and where each came from (``flag --jobs``, ``env X``, ...)."""

    values: dict[str, Any]
    sources: dict[str, str]
    config_file: str | None

    def render(self) -> str:
        """The aligned table ``--print-config`` prints."""
        rows = [("option", "value", "source")]
        for key, value in self.values.items():
            option = OPTIONS_BY_KEY[key]
            label = f"{key} ({option.unit})" if option.unit else key
            rows.append((label, _show(key, value), self.sources[key]))
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
        if self.config_file is not None:
            lines.append(f"config file: {self.config_file}")
        return "\n".join(lines) + "\n"


def _show(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(value) if value else "-"
    if isinstance(value, bool):
        return str(value).lower()
    if key == "connection":
        return redact_password(str(value))
    return str(value)


def redact_password(dsn: str) -> str:
    """``dsn`` with its passwords replaced by ``***`` (URL, URL query and keyword forms)."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", parts.query)
        return urlunsplit(parts._replace(query=query))
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


def resolve_settings(
    args: argparse.Namespace,
    keys: Sequence[str],
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Settings:
    """Resolve ``keys`` for a parsed command line and store the values on ``args``.

    Raises:
      SettingsError: a value of any source cannot be used, or the file cannot be read.
    """
    env = os.environ if environ is None else environ
    file_values, config_file = _read_config(args, env, Path(cwd or os.getcwd()))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in keys:
        option = OPTIONS_BY_KEY[key]
        value, source = _resolve_one(option, args, env, file_values, config_file)
        values[key] = value
        sources[key] = source
        setattr(args, key, value)
    settings = Settings(values, sources, config_file)
    args.resolved_settings = settings
    return settings


def _resolve_one(
    option: Option,
    args: argparse.Namespace,
    env: Mapping[str, str],
    file_values: Mapping[str, Any],
    config_file: str | None,
) -> tuple[Any, str]:
    if option.key in vars(args):
        source = f"flag {option.flag}"
        value = getattr(args, option.key)
        if option.kind == "list":
            value = _split_list(value)
        return _check(option, value, source), source
    for name in (option.env, *option.env_fallbacks):
        text = env.get(name, "")
        if text.strip():
            source = f"env {name}"
            return _check(option, _from_text(option, text, source), source), source
    if option.key in file_values:
        source = f"file {config_file}"
        return _check(option, _from_toml(option, file_values[option.key], source), source), source
    default = list(option.default) if isinstance(option.default, list) else option.default
    return default, "default"


def _split_list(items: Sequence[str]) -> list[str]:
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_text(option: Option, text: str, source: str) -> Any:
    text = text.strip()
    try:
        if option.kind == "int":
            return int(text)
        if option.kind == "float":
            return float(text)
    except ValueError:
        kind = "an integer" if option.kind == "int" else "a number"
        raise SettingsError(f"{source}: expected {kind}, got {text!r}") from None
    if option.kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise SettingsError(f"{source}: expected true or false (1/0, yes/no), got {text!r}")
    if option.kind == "list":
        return _split_list([text])
    if option.kind == "choice":
        return text.upper() if option.key == "log_level" else text.lower()
    return text


def _from_toml(option: Option, value: Any, source: str) -> Any:
    where = f"{source}: {option.key}"
    kind = option.kind
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        unit = " (milliseconds)" if option.unit == "ms" else ""
        raise SettingsError(f"{where}: expected an integer{unit}, got {value!r}")
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingsError(f"{where}: expected a number of seconds, got {value!r}")
        return float(value)
    if kind == "bool" and not isinstance(value, bool):
        raise SettingsError(f"{where}: expected true or false, got {value!r}")
    if kind in ("str", "choice") and not isinstance(value, str):
        raise SettingsError(f"{where}: expected a string, got {value!r}")
    if kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(f"{where}: expected a list of strings, got {value!r}")
        return _split_list(value)
    if kind == "choice":
        return value.upper() if option.key == "log_level" else value.lower()
    return value


def _check(option: Option, value: Any, source: str) -> Any:
    """Range and choice checks, the same for every source."""
    where = source if source.startswith(("flag", "env")) else f"{source}: {option.key}"
    if option.minimum is not None and value < option.minimum:
        unit = f" {option.unit}" if option.unit else ""
        minimum = int(option.minimum) if option.minimum == int(option.minimum) else option.minimum
        raise SettingsError(f"{where}: must be at least {minimum}{unit}, got {value}")
    if option.maximum is not None and value > option.maximum:
        raise SettingsError(f"{where}: must be at most {option.maximum:g}, got {value}")
    if option.choices and value not in option.choices:
        raise SettingsError(f"{where}: expected one of {', '.join(option.choices)}, got {value!r}")
    if option.key == "schema":
        try:
            validate_identifier(value, what="schema name")
        except ConfigError as exc:
            raise SettingsError(f"{where}: {exc}") from None
    if option.kind == "str" and value == "" and option.key != "connection":
        raise SettingsError(f"{where}: must not be empty")
    return value


def _read_config(
    args: argparse.Namespace, env: Mapping[str, str], cwd: Path
) -> tuple[dict[str, Any], str | None]:
    """The config file's table and its name: ``--config``, ``$KONGTASK_CONFIG``, else
    ``[tool.kongtask]`` of ``./pyproject.toml`` when present; ``({}, None)`` without one."""
    explicit = getattr(args, "config", None) or env.get(CONFIG_ENV, "").strip() or None
    if explicit is not None:
        path = cwd / explicit
        if not path.is_file():
            origin = "--config" if getattr(args, "config", None) else f"${CONFIG_ENV}"
            raise SettingsError(f"{origin}: no such file: {explicit}")
        document = _load_toml(path, explicit)
        if path.name == PYPROJECT:
            return _kongtask_table(document, explicit), explicit
        return _known_keys(document, explicit), explicit
    path = cwd / PYPROJECT
    if not path.is_file():
        return {}, None
    document = _load_toml(path, PYPROJECT)
    table = _kongtask_table(document, PYPROJECT)
    if not table:
        return {}, None
    return table, f"{PYPROJECT} [tool.kongtask]"


def _load_toml(path: Path, name: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"file {name}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"file {name}: cannot be read: {exc}") from None


def _kongtask_table(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    tool = document.get("tool", {})
    table = tool.get("kongtask", {}) if isinstance(tool, dict) else {}
    if not isinstance(table, dict):
        raise SettingsError(f"file {name}: [tool.kongtask] must be a table")
    return _known_keys(table, f"{name} [tool.kongtask]")


def _known_keys(table: Mapping[str, Any], name: str) -> dict[str, Any]:
    for key in table:
        if key not in OPTIONS_BY_KEY:
            close = difflib.get_close_matches(key, list(OPTIONS_BY_KEY), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(
                f"file {name}: unknown key {key!r}{hint}; known keys: " + ", ".join(OPTIONS_BY_KEY)
            )
    return dict(table)
