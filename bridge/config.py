"""Configuration: TOML (and a few environment variables) into frozen dataclasses, once.

The keys, defaults and environment overrides are those of interface.md "Config" and
github.md "Credentials". Every problem is collected and reported as one
``key: what is wrong`` line, so ``check-config`` shows them all at once; an unknown
key is a problem, because a typo must not pass silently. Secrets are wrapped in
:class:`Secret`, whose ``str`` and ``repr`` never show the value.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from bridge.errors import ConfigError


class Secret:
    """A string that never shows itself in logs, errors or reprs; ``.value`` reveals it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 26_214_400
    public_url: str = ""


@dataclass(frozen=True, slots=True)
class GitHubHook:
    """One webhook watched in token mode: ``repo = "org/name"`` or ``org = "name"``."""

    hook_id: int
    repo: str = ""
    org: str = ""


@dataclass(frozen=True, slots=True)
class GitHubConfig:
    webhook_secrets: tuple[Secret, ...] = ()
    api_url: str = "https://api.github.com"
    app_id: int | None = None
    private_key_file: str = ""
    private_key: Secret | None = None
    token: Secret | None = None
    hooks: tuple[GitHubHook, ...] = ()
    redeliver: bool = False
    redeliver_interval_seconds: float = 300.0
    redeliver_lookback_hours: float = 72.0
    redeliver_max_per_sweep: int = 100
    report_failures: bool = False


@dataclass(frozen=True, slots=True)
class VelaConfig:
    token: Secret
    url: str = "http://127.0.0.1:8080"
    timeout_seconds: float = 10.0
    auth_retry_seconds: float = 30.0  # while Vela refuses the token, one try this often


@dataclass(frozen=True, slots=True)
class QueueConfig:
    url: str = "sqlite:///./vela-bridge.db"
    lease_seconds: float = 60.0
    retention_days: float = 14.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 25
    max_age_seconds: float = 86_400.0
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 900.0


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    token: Secret | None = None


@dataclass(frozen=True, slots=True)
class EventsConfig:
    deployment: Literal["build", "deployment"] = "build"
    fork_pull_requests: Literal["trusted", "never", "always"] = "trusted"


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: Literal["auto", "json", "text"] = "auto"


@dataclass(frozen=True, slots=True)
class Config:
    vela: VelaConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    github: GitHubConfig = field(default_factory=GitHubConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    operator: OperatorConfig = field(default_factory=OperatorConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    log: LogConfig = field(default_factory=LogConfig)


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class _Section:
    """Reads one TOML table, recording a problem per bad key instead of raising."""

    def __init__(self, name: str, raw: object, env: Mapping[str, str], problems: list[str]):
        self.name = name
        self.env = env
        self.problems = problems
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            problems.append(f"{name}: must be a table")
            raw = {}
        self.raw: dict[str, Any] = dict(raw)

    def _problem(self, key: str, text: str) -> None:
        self.problems.append(f"{self.name}.{key}: {text}")

    def _take(self, key: str) -> Any:
        return self.raw.pop(key, None)

    def string(self, key: str, default: str) -> str:
        value = self._take(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self._problem(key, "must be a string")
            return default
        return value

    def number(self, key: str, default: float, *, positive: bool = True) -> float:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._problem(key, "must be a number")
            return default
        if positive and not value > 0:
            self._problem(key, "must be greater than 0")
            return default
        return float(value)

    def integer(self, key: str, default: int, *, low: int = 1, high: int | None = None) -> int:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self._problem(key, "must be a whole number")
            return default
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            self._problem(key, f"must be {span}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._take(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self._problem(key, "must be true or false")
            return default
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in choices:
            self._problem(key, "must be one of " + ", ".join(f'"{c}"' for c in choices))
            return default
        return value

    def url(self, key: str, default: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
        value = self.string(key, default)
        if value and not _is_url(value, schemes):
            self._problem(key, "not a URL")
            return default
        if value and "@" in urlsplit(value).netloc:
            # A password there would be shown wherever the URL is (the operator API's
            # VELA_URL), and aiohttp refuses it beside the Bearer token: every send fails.
            self._problem(
                key, "must not contain a user name or password; credentials have keys of their own"
            )
            return default
        return value.rstrip("/")

    def secret(self, key: str, value: object = None) -> Secret | None:
        """A secret: a plain string, or ``"env:NAME"`` naming an environment variable."""
        if value is None:
            value = self._take(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self._problem(key, "must be a string")
            return None
        if value.startswith("env:"):
            name = value[4:]
            if name not in self.env:
                self._problem(key, f"environment variable {name} is not set")
                return None
            value = self.env[name]
        if not value:
            self._problem(key, "must not be empty")
            return None
        return Secret(value)

    def overridable_secret(self, key: str, env_name: str) -> Secret | None:
        """A secret that environment variable ``env_name`` replaces when it is set.

        The file's value is then still type-checked but not resolved: an ``env:``
        reference that the override makes moot is not a problem.
        """
        in_file = self._take(key)
        if env_name not in self.env:
            return self.secret(key, in_file)
        if in_file is not None and not isinstance(in_file, str):
            self._problem(key, "must be a string")
        return self.secret(key, self.env[env_name])

    def finish(self) -> None:
        for key in sorted(self.raw):
            self._problem(key, "unknown key")


def redact_url(url: str) -> str:
    """``url`` with any password in it (``user:pw@`` or ``?password=``) masked."""
    from bridge.queue._postgres_url import masked  # no driver import: safe for SQLite users

    return masked(url)


def redirect_target(location: str) -> str:
    """Where a ``Location`` header points, as a message may show it: no user information,
    no query (either may carry a secret); "nowhere" for an empty one."""
    to = urlsplit(location)
    shown = f"{to.scheme}://{to.netloc.rpartition('@')[2]}{to.path}" if to.netloc else to.path
    return shown or "nowhere"


def _is_url(value: str, schemes: tuple[str, ...]) -> bool:
    try:
        parts = urlsplit(value)
        return parts.scheme in schemes and bool(parts.netloc) and parts.port != 0
    except ValueError:
        return False


def load(path: str | Path | None, env: Mapping[str, str]) -> Config:
    """Read ``path`` (or only defaults when None) with ``env`` applied; raise ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{path}: cannot be read ({exc.strerror})"]) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path}: not valid TOML ({exc})"]) from None
    config, problems = _read(raw, env)
    problems.extend(_credential_problems(config.github, problems))
    if problems:
        raise ConfigError(problems)
    return config


def parse(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """The keys alone, each checked for itself; :func:`load` also checks the credentials."""
    config, problems = _read(raw, env)
    if problems:
        raise ConfigError(problems)
    return config


def _read(raw: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Config, list[str]]:
    """The config and every problem found; a key with a problem holds its default."""
    problems: list[str] = []
    raw = dict(raw)

    def section(name: str) -> _Section:
        return _Section(name, raw.pop(name, None), env, problems)

    s = section("server")
    server = ServerConfig(
        host=s.string("host", "127.0.0.1"),
        port=s.integer("port", 8000, low=0, high=65535),
        max_body_bytes=s.integer("max_body_bytes", 26_214_400),
        public_url=s.url("public_url", ""),
    )
    s.finish()

    github = _github(section("github"), env)

    v = section("vela")
    # An environment override replaces the file's value unread (it may name a missing env:).
    vela_token = v.overridable_secret("token", "VELA_TOKEN")
    if vela_token is None and not any(p.startswith("vela.token:") for p in problems):
        problems.append("vela.token: required (or set VELA_TOKEN)")
    vela = VelaConfig(
        token=vela_token or Secret(""),
        url=v.url("url", "http://127.0.0.1:8080"),
        timeout_seconds=v.number("timeout_seconds", 10.0),
        auth_retry_seconds=v.number("auth_retry_seconds", 30.0),
    )
    v.finish()

    q = section("queue")
    queue = QueueConfig(
        url=q.string("url", "sqlite:///./vela-bridge.db"),
        lease_seconds=q.number("lease_seconds", 60.0),
        retention_days=q.number("retention_days", 14.0),
    )
    if not queue.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        problems.append('queue.url: must start with "sqlite:///" or "postgresql://"')
    if queue.url.removeprefix("sqlite:///") in ("", ":memory:"):
        problems.append('queue.url: needs a file path, e.g. "sqlite:///./vela-bridge.db"')
    if queue.lease_seconds <= vela.timeout_seconds:
        problems.append("queue.lease_seconds: must exceed vela.timeout_seconds")
    q.finish()

    r = section("retry")
    retry = RetryConfig(
        max_attempts=r.integer("max_attempts", 25),
        max_age_seconds=r.number("max_age_seconds", 86_400.0),
        initial_backoff_seconds=r.number("initial_backoff_seconds", 1.0),
        max_backoff_seconds=r.number("max_backoff_seconds", 900.0),
    )
    if retry.max_backoff_seconds < retry.initial_backoff_seconds:
        problems.append("retry.max_backoff_seconds: must not be less than initial_backoff_seconds")
    r.finish()

    o = section("operator")
    operator_token = o.overridable_secret("token", "BRIDGE_OPERATOR_TOKEN")
    o.finish()

    e = section("events")
    events = EventsConfig(
        deployment=cast(Any, e.choice("deployment", "build", ("build", "deployment"))),
        fork_pull_requests=cast(
            Any, e.choice("fork_pull_requests", "trusted", ("trusted", "never", "always"))
        ),
    )
    e.finish()

    lg = section("log")
    log = LogConfig(
        level=lg.choice("level", "info", _LOG_LEVELS),
        format=cast(Any, lg.choice("format", "auto", ("auto", "json", "text"))),
    )
    lg.finish()

    for name in sorted(raw):
        problems.append(f"{name}: unknown key")
    return Config(
        server=server,
        github=github,
        vela=vela,
        queue=queue,
        retry=retry,
        operator=OperatorConfig(token=operator_token),
        events=events,
        log=log,
    ), problems


def _github(g: _Section, env: Mapping[str, str]) -> GitHubConfig:
    secrets: list[Secret] = []
    listed = g._take("webhook_secrets")
    if listed is not None and not isinstance(listed, list):
        g._problem("webhook_secrets", "must be a list of strings")
    elif listed:
        for index, item in enumerate(listed):
            secret = g.secret(f"webhook_secrets[{index}]", item)
            if secret is not None:
                secrets.append(secret)
    if env.get("GITHUB_WEBHOOK_SECRET"):
        secrets.append(Secret(env["GITHUB_WEBHOOK_SECRET"]))
    if not secrets and not any(p.startswith("github.webhook_secrets") for p in g.problems):
        g._problem(
            "webhook_secrets", "at least one secret is required (or set GITHUB_WEBHOOK_SECRET)"
        )

    app_id = g._take("app_id")
    if app_id is not None and (isinstance(app_id, bool) or not isinstance(app_id, int)):
        g._problem("app_id", "must be a whole number")
        app_id = None
    config = GitHubConfig(
        webhook_secrets=tuple(secrets),
        api_url=g.url("api_url", "https://api.github.com"),
        app_id=app_id,
        private_key_file=g.string("private_key_file", ""),
        private_key=g.secret("private_key"),
        token=g.secret("token"),
        hooks=_hooks(g),
        redeliver=g.boolean("redeliver", False),
        redeliver_interval_seconds=g.number("redeliver_interval_seconds", 300.0),
        redeliver_lookback_hours=g.number("redeliver_lookback_hours", 72.0),
        redeliver_max_per_sweep=g.integer("redeliver_max_per_sweep", 100),
        report_failures=g.boolean("report_failures", False),
    )
    g.finish()
    return config


def _hooks(g: _Section) -> tuple[GitHubHook, ...]:
    raw = g._take("hooks")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(h, dict) for h in raw):
        g._problem("hooks", "must be an array of tables ([[github.hooks]])")
        return ()
    hooks = []
    for index, table in enumerate(raw):
        h = _Section(f"github.hooks[{index}]", table, g.env, g.problems)
        hook = GitHubHook(
            hook_id=h.integer("hook_id", 0), repo=h.string("repo", ""), org=h.string("org", "")
        )
        if "hook_id" not in table:
            h._problem("hook_id", "required")
        if bool(hook.repo) == bool(hook.org):
            h._problem("repo", 'give exactly one of repo = "org/name" or org = "name"')
        elif hook.repo and hook.repo.count("/") != 1:
            h._problem("repo", 'must be "org/name"')
        h.finish()
        hooks.append(hook)
    return tuple(hooks)


# The keys the credential checks combine: while one of them has a problem of its own, those
# checks would only repeat it in other words ("app_id: needs a private key"), or judge the
# default left in its place ("redeliver: needs [[github.hooks]]" for hooks that are there).
_CREDENTIAL_KEYS = (
    "github.app_id",
    "github.private_key",
    "github.private_key_file",
    "github.token",
    "github.hooks",
)


def _credential_problems(github: GitHubConfig, found: list[str]) -> list[str]:
    """What the keys cannot show one by one: GitHub credentials that cannot work (the key
    file, the key's format, which keys go together)."""
    from bridge.github import problems  # here: bridge.github imports this module

    if any(line.split(":", 1)[0].split("[", 1)[0] in _CREDENTIAL_KEYS for line in found):
        return []
    return problems(github)
