"""Configuration: interface.md "Config" and github.md "Credentials", and the CLI around it.

Defaults, every key of a full file, ``env:NAME`` secrets and the environment overrides,
problems that name their key (all of them at once), secrets that never show; then
``check-config`` and ``serve`` as a user runs them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge import __version__
from bridge.config import (
    Config,
    EventsConfig,
    GitHubConfig,
    GitHubHook,
    LogConfig,
    OperatorConfig,
    QueueConfig,
    RetryConfig,
    Secret,
    ServerConfig,
    VelaConfig,
    load,
    parse,
)
from bridge.errors import ConfigError
from tests.fakes.vela import _free_port

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "webhook-secret-from-env"
VELA_TOKEN = "vela-token-from-env"
ENV = {"GITHUB_WEBHOOK_SECRET": WEBHOOK_SECRET, "VELA_TOKEN": VELA_TOKEN}

# interface.md's table and github.md's credentials, key by key. Floats are written as
# floats and whole numbers as ints: the type is part of the contract.
DEFAULTS: dict[str, Any] = {
    "server.host": "127.0.0.1",
    "server.port": 8000,
    "server.max_body_bytes": 26_214_400,
    "server.public_url": "",
    "vela.url": "http://127.0.0.1:8080",
    "vela.timeout_seconds": 10.0,
    "vela.auth_retry_seconds": 30.0,  # interface.md: "re-tries the token every 30 s"
    "queue.url": "sqlite:///./vela-bridge.db",
    "queue.lease_seconds": 60.0,
    "queue.retention_days": 14.0,
    "retry.max_attempts": 25,
    "retry.max_age_seconds": 86_400.0,
    "retry.initial_backoff_seconds": 1.0,
    "retry.max_backoff_seconds": 900.0,
    "operator.token": None,
    "events.deployment": "build",
    "events.fork_pull_requests": "trusted",
    "log.level": "info",
    "log.format": "auto",
    "github.api_url": "https://api.github.com",
    "github.app_id": None,
    "github.private_key_file": "",
    "github.private_key": None,
    "github.token": None,
    "github.hooks": (),
    "github.redeliver": False,
    "github.redeliver_interval_seconds": 300.0,
    "github.redeliver_lookback_hours": 72.0,
    "github.redeliver_max_per_sweep": 100,
    "github.report_failures": False,
}
REQUIRED = {"github.webhook_secrets", "vela.token"}  # no default: a config needs them


def get(config: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def config_keys() -> set[str]:
    """Every ``section.key`` the dataclasses hold."""
    sections = typing.get_type_hints(Config)
    return {
        f"{name}.{key.name}"
        for name, section in sections.items()
        for key in dataclasses.fields(section)
    }


def problems_of(raw: Mapping[str, Any], env: Mapping[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(raw, env)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def with_required(**sections: Mapping[str, Any]) -> dict[str, Any]:
    """A file with the two required secrets in it, plus ``sections`` merged in."""
    raw: dict[str, Any] = {
        "github": {"webhook_secrets": ["file-secret"]},
        "vela": {"token": "file-token"},
    }
    for name, table in sections.items():
        raw[name] = {**raw.get(name, {}), **table} if isinstance(table, Mapping) else table
    return raw


# -- defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "default"), list(DEFAULTS.items()))
def test_default(key: str, default: Any) -> None:
    value = get(parse({}, ENV), key)
    assert value == default
    assert type(value) is type(default)


def test_the_table_covers_every_key() -> None:
    # A key added to config.py without a documented default fails here.
    assert config_keys() == set(DEFAULTS) | REQUIRED


def test_defaults_plus_env_is_a_whole_config() -> None:
    config = parse({}, ENV)
    assert config.github.webhook_secrets == (Secret(WEBHOOK_SECRET),)
    assert config.vela.token == Secret(VELA_TOKEN)
    assert load(None, ENV) == config


# -- a file with every key -------------------------------------------------------------------

FULL = """
[server]
host = "0.0.0.0"
port = 9443
max_body_bytes = 1048576
public_url = "https://hooks.example.com/"

[github]
webhook_secrets = ["old-secret", "env:NEW_WEBHOOK_SECRET"]
api_url = "https://ghe.example.com/api/v3"
app_id = 123456
private_key_file = "/etc/vela-bridge/app.pem"
private_key = "env:APP_KEY"
token = "ghp-file-token"
redeliver = true
redeliver_interval_seconds = 120
redeliver_lookback_hours = 24.5
redeliver_max_per_sweep = 10
report_failures = true

[[github.hooks]]
repo = "octo-org/web.app"
hook_id = 12345678

[[github.hooks]]
org = "octo-org"
hook_id = 42

[vela]
url = "https://vela.example.com"
token = "vela-file-token"
timeout_seconds = 2.5
auth_retry_seconds = 5

[queue]
url = "postgresql://bridge@db.example.com/bridge"
lease_seconds = 30
retention_days = 3.5

[retry]
max_attempts = 7
max_age_seconds = 3600
initial_backoff_seconds = 0.5
max_backoff_seconds = 60

[operator]
token = "operator-file-token"

[events]
deployment = "deployment"
fork_pull_requests = "never"

[log]
level = "debug"
format = "json"
"""


def test_a_file_with_every_key() -> None:
    # Every key, each read for itself: the two private keys together are a credential
    # problem that only load() reports (test_credential_problems_come_with_the_others).
    env = {"NEW_WEBHOOK_SECRET": "new-secret", "APP_KEY": "-----BEGIN KEY-----"}
    config = parse(tomllib.loads(FULL), env)
    assert config == Config(
        server=ServerConfig(
            host="0.0.0.0",
            port=9443,
            max_body_bytes=1_048_576,
            public_url="https://hooks.example.com",
        ),
        github=GitHubConfig(
            webhook_secrets=(Secret("old-secret"), Secret("new-secret")),
            api_url="https://ghe.example.com/api/v3",
            app_id=123456,
            private_key_file="/etc/vela-bridge/app.pem",
            private_key=Secret("-----BEGIN KEY-----"),
            token=Secret("ghp-file-token"),
            hooks=(
                GitHubHook(hook_id=12345678, repo="octo-org/web.app"),
                GitHubHook(hook_id=42, org="octo-org"),
            ),
            redeliver=True,
            redeliver_interval_seconds=120.0,
            redeliver_lookback_hours=24.5,
            redeliver_max_per_sweep=10,
            report_failures=True,
        ),
        vela=VelaConfig(
            token=Secret("vela-file-token"),
            url="https://vela.example.com",
            timeout_seconds=2.5,
            auth_retry_seconds=5.0,
        ),
        queue=QueueConfig(
            url="postgresql://bridge@db.example.com/bridge", lease_seconds=30.0, retention_days=3.5
        ),
        retry=RetryConfig(
            max_attempts=7,
            max_age_seconds=3600.0,
            initial_backoff_seconds=0.5,
            max_backoff_seconds=60.0,
        ),
        operator=OperatorConfig(token=Secret("operator-file-token")),
        events=EventsConfig(deployment="deployment", fork_pull_requests="never"),
        log=LogConfig(level="debug", format="json"),
    )
    # Every key of the dataclasses was given a non-default value above.
    defaults = parse({}, ENV)
    assert {k for k in DEFAULTS if get(config, k) == get(defaults, k)} == set()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.vela.url = "http://elsewhere"  # type: ignore[misc]


EXAMPLE = ROOT / "config.example.toml"


def test_the_example_config_is_the_defaults() -> None:
    example = load(EXAMPLE, {"GITHUB_WEBHOOK_SECRET_OLD": "s", "VELA_TOKEN": "t"})
    assert example == parse({}, {"GITHUB_WEBHOOK_SECRET": "s", "VELA_TOKEN": "t"})


def test_the_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    # Uncomment the optional keys it shows commented out: still valid, no typo.
    uncommented = re.sub(r"(?m)^# ?(?=\[\[|[a-z_]+ += )", "", text)
    env = {
        "GITHUB_WEBHOOK_SECRET_OLD": "s",
        "VELA_TOKEN": "t",
        "GITHUB_APP_PRIVATE_KEY": "k",
        "GITHUB_TOKEN": "g",
        "BRIDGE_OPERATOR_TOKEN": "o",
    }
    # Keys only: the example shows both ways to give the App's key, which load() refuses.
    config = parse(tomllib.loads(uncommented), env)
    assert config.github.app_id == 123456
    assert config.github.private_key == Secret("k") and config.github.token == Secret("g")
    assert config.server.public_url.startswith("https://")
    shown = {
        f"{section}.{key}"
        for section, body in re.findall(r"(?ms)^\[([a-z]+)\]\n(.*?)(?=^\[[a-z]|\Z)", uncommented)
        for key in re.findall(r"(?m)^([a-z_]+) += ", body)
    }
    assert config_keys() - {"github.hooks"} <= shown
    assert config.github.hooks == (GitHubHook(hook_id=12345678, repo="octo-org/web.app"),)


# -- secrets from the environment --------------------------------------------------------------

SECRET_KEYS = [
    # (key as problems name it, the raw file, where the Secret lands)
    ("github.webhook_secrets[1]", {"github": {"webhook_secrets": ["plain", "env:THE_VAR"]}}),
    ("vela.token", {"vela": {"token": "env:THE_VAR"}}),
    ("operator.token", {"operator": {"token": "env:THE_VAR"}}),
    ("github.private_key", {"github": {"private_key": "env:THE_VAR"}}),
    ("github.token", {"github": {"token": "env:THE_VAR"}}),
]


def secret_at(config: Config, key: str) -> Secret | None:
    if key.startswith("github.webhook_secrets"):
        return config.github.webhook_secrets[1]
    value: Secret | None = get(config, key)
    return value


def merged(raw: Mapping[str, Any]) -> dict[str, Any]:
    return with_required(**raw)  # merged key by key into the required sections


@pytest.mark.parametrize(("key", "raw"), SECRET_KEYS, ids=[k for k, _ in SECRET_KEYS])
def test_env_secret_is_read(key: str, raw: Mapping[str, Any]) -> None:
    config = parse(merged(raw), {"THE_VAR": "value-from-the-environment"})
    assert secret_at(config, key) == Secret("value-from-the-environment")


@pytest.mark.parametrize(("key", "raw"), SECRET_KEYS, ids=[k for k, _ in SECRET_KEYS])
def test_env_secret_missing_is_a_problem_naming_the_key(key: str, raw: Mapping[str, Any]) -> None:
    problems = problems_of(merged(raw), {})
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}: ")
    assert "THE_VAR" in problems[0]


@pytest.mark.parametrize(("key", "raw"), SECRET_KEYS, ids=[k for k, _ in SECRET_KEYS])
def test_env_secret_empty_is_a_problem_naming_the_key(key: str, raw: Mapping[str, Any]) -> None:
    problems = problems_of(merged(raw), {"THE_VAR": ""})
    assert problems == [f"{key}: must not be empty"]


def test_vela_token_env_overrides_the_file() -> None:
    config = parse(with_required(), {"VELA_TOKEN": "from-env"})
    assert config.vela.token == Secret("from-env")
    assert parse(with_required(), {}).vela.token == Secret("file-token")


def test_vela_token_is_required() -> None:
    raw = with_required()
    del raw["vela"]
    assert problems_of(raw, {}) == ["vela.token: required (or set VELA_TOKEN)"]
    assert parse(raw, {"VELA_TOKEN": "t"}).vela.token == Secret("t")


def test_github_webhook_secret_env_adds_one() -> None:
    raw = with_required(github={"webhook_secrets": ["old", "new"]})
    config = parse(raw, {"GITHUB_WEBHOOK_SECRET": "from-env"})
    assert config.github.webhook_secrets == (Secret("old"), Secret("new"), Secret("from-env"))
    assert parse(raw, {}).github.webhook_secrets == (Secret("old"), Secret("new"))


def test_a_webhook_secret_is_required() -> None:
    raw = with_required(github={"webhook_secrets": []})
    [problem] = problems_of(raw, {})
    assert problem.startswith("github.webhook_secrets: ")
    assert "GITHUB_WEBHOOK_SECRET" in problem
    del raw["github"]
    [problem] = problems_of(raw, {})
    assert problem.startswith("github.webhook_secrets: ")
    config = parse(raw, {"GITHUB_WEBHOOK_SECRET": "only"})
    assert config.github.webhook_secrets == (Secret("only"),)


def test_operator_token_env_overrides_the_file() -> None:
    raw = with_required(operator={"token": "from-file"})
    assert parse(raw, {}).operator.token == Secret("from-file")
    assert parse(raw, {"BRIDGE_OPERATOR_TOKEN": "from-env"}).operator.token == Secret("from-env")
    config = parse(with_required(), {"BRIDGE_OPERATOR_TOKEN": "only-env"})
    assert config.operator.token == Secret("only-env")
    assert parse(with_required(), {}).operator.token is None  # unset: the API answers 401


# -- problems that name the key -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        pytest.param({"servr": {"port": 1}}, "servr: unknown key", id="top-level-table"),
        pytest.param({"port": 8000}, "port: unknown key", id="top-level-value"),
        pytest.param({"vela": {"tokn": "x"}}, "vela.tokn: unknown key", id="in-a-section"),
        pytest.param({"server": {"Port": 1}}, "server.Port: unknown key", id="case-matters"),
        pytest.param({"vela": {"extra": {"a": 1}}}, "vela.extra: unknown key", id="subtable"),
        pytest.param(
            {"github": {"hooks": [{"repo": "a/b", "hook_id": 1, "hookid": 2}]}},
            "github.hooks[0].hookid: unknown key",
            id="in-github-hooks",
        ),
        pytest.param(
            {"github": {"webhook_secret": "s"}},
            "github.webhook_secret: unknown key",
            id="singular-typo",
        ),
    ],
)
def test_unknown_keys_are_problems(raw: Mapping[str, Any], problem: str) -> None:
    assert problems_of(with_required(**raw)) == [problem]


@pytest.mark.parametrize(
    ("section", "table", "key", "fragment"),
    [
        ("server", {"port": "8000"}, "server.port", "whole number"),
        ("server", {"port": 8000.0}, "server.port", "whole number"),
        ("server", {"port": True}, "server.port", "whole number"),
        ("server", {"port": 70000}, "server.port", "65535"),
        ("server", {"port": -1}, "server.port", "from 0"),
        ("server", {"max_body_bytes": 0}, "server.max_body_bytes", "at least 1"),
        ("server", {"host": 127}, "server.host", "string"),
        ("vela", {"timeout_seconds": "10"}, "vela.timeout_seconds", "number"),
        ("vela", {"timeout_seconds": 0}, "vela.timeout_seconds", "greater than 0"),
        ("vela", {"timeout_seconds": -5.0}, "vela.timeout_seconds", "greater than 0"),
        ("vela", {"token": 12345}, "vela.token", "string"),
        ("queue", {"retention_days": True}, "queue.retention_days", "number"),
        ("queue", {"url": "mysql://db/bridge"}, "queue.url", "sqlite:///"),
        ("queue", {"url": "./vela-bridge.db"}, "queue.url", "sqlite:///"),
        ("retry", {"max_attempts": 2.5}, "retry.max_attempts", "whole number"),
        ("retry", {"max_attempts": 0}, "retry.max_attempts", "at least 1"),
        ("retry", {"max_age_seconds": [1]}, "retry.max_age_seconds", "number"),
        ("retry", {"max_backoff_seconds": 0.5}, "retry.max_backoff_seconds", "initial"),
        ("github", {"redeliver": "yes"}, "github.redeliver", "true or false"),
        ("github", {"report_failures": 1}, "github.report_failures", "true or false"),
        ("github", {"app_id": "123"}, "github.app_id", "whole number"),
        ("github", {"redeliver_max_per_sweep": 0}, "github.redeliver_max_per_sweep", "at least"),
        ("github", {"webhook_secrets": "s"}, "github.webhook_secrets", "list"),
        ("github", {"webhook_secrets": ["ok", 1]}, "github.webhook_secrets[1]", "string"),
        ("github", {"hooks": {"repo": "a/b"}}, "github.hooks", "[[github.hooks]]"),
        ("github", {"hooks": ["a/b"]}, "github.hooks", "[[github.hooks]]"),
        ("github", {"hooks": [{"repo": "a/b"}]}, "github.hooks[0].hook_id", "required"),
        ("github", {"hooks": [{"repo": "ab", "hook_id": 1}]}, "github.hooks[0].repo", "org/name"),
        ("github", {"hooks": [{"hook_id": 1}]}, "github.hooks[0].repo", "exactly one"),
        (
            "github",
            {"hooks": [{"repo": "a/b", "hook_id": 1}, {"repo": "a/b", "org": "a", "hook_id": 2}]},
            "github.hooks[1].repo",
            "exactly one",
        ),
        ("operator", {"token": ["a", "b"]}, "operator.token", "string"),
        ("events", {"deployment": "both"}, "events.deployment", '"build", "deployment"'),
        ("events", {"fork_pull_requests": "sometimes"}, "events.fork_pull_requests", "trusted"),
        ("events", {"fork_pull_requests": True}, "events.fork_pull_requests", "string"),
        ("log", {"level": "verbose"}, "log.level", '"debug"'),
        ("log", {"format": "xml"}, "log.format", '"auto", "json", "text"'),
    ],
)
def test_a_wrong_value_is_one_problem_naming_the_key(
    section: str, table: Mapping[str, Any], key: str, fragment: str
) -> None:
    problems = problems_of(with_required(**{section: table}))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}: "), problems
    assert fragment in problems[0]


@pytest.mark.parametrize("hook_id", [0, -5, "12"])
def test_an_invalid_hook_id_is_one_problem(hook_id: object) -> None:
    raw = with_required(github={"hooks": [{"repo": "a/b", "hook_id": hook_id}]})
    [problem] = problems_of(raw)
    assert problem.startswith("github.hooks[0].hook_id: ")
    assert "required" not in problem


def test_a_sqlite_url_needs_a_path() -> None:
    [problem] = problems_of(with_required(queue={"url": "sqlite:///"}))
    assert problem.startswith("queue.url: ")


@pytest.mark.parametrize("section", ["server", "github", "vela", "queue", "log"])
def test_a_section_that_is_not_a_table(section: str) -> None:
    problems = problems_of({**with_required(), section: "oops"}, ENV)
    assert f"{section}: must be a table" in problems


@pytest.mark.parametrize(
    ("key", "url"),
    [
        ("vela.url", "not a URL"),
        ("vela.url", "vela.example.com"),
        ("vela.url", "ftp://vela.example.com"),
        ("vela.url", "http://"),
        ("vela.url", "http://vela:99999"),
        ("vela.url", "http://vela:port"),
        ("vela.url", "http://vela:0"),
        ("github.api_url", "api.github.com/api/v3"),
        ("server.public_url", "localhost:8000"),
    ],
)
def test_a_bad_url_is_not_a_url(key: str, url: str) -> None:
    section, name = key.split(".")
    assert problems_of(with_required(**{section: {name: url}})) == [f"{key}: not a URL"]


@pytest.mark.parametrize("key", ["vela.url", "github.api_url", "server.public_url"])
@pytest.mark.parametrize("userinfo", ["admin:hunter2@", "admin@", ":hunter2@"])
def test_a_url_with_credentials_is_refused_without_showing_them(key: str, userinfo: str) -> None:
    section, name = key.split(".")
    problems = problems_of(with_required(**{section: {name: f"https://{userinfo}host.example"}}))
    assert problems == [
        f"{key}: must not contain a user name or password; credentials have keys of their own"
    ]
    assert "hunter2" not in " ".join(problems)


def test_good_urls_lose_their_trailing_slash() -> None:
    config = parse(
        with_required(
            vela={"url": "https://vela.example.com:8443/"},
            github={"api_url": "https://ghe.example.com/api/v3/"},
        ),
        {},
    )
    assert config.vela.url == "https://vela.example.com:8443"
    assert config.github.api_url == "https://ghe.example.com/api/v3"


@pytest.mark.parametrize(
    ("lease", "timeout", "ok"),
    [
        (10, 10, False),  # equal is not enough: the claim may lapse while Vela still answers
        (5, None, False),  # against the default timeout of 10
        (30, 60, False),
        (10.5, 10, True),
        (11, None, True),
    ],
)
def test_lease_must_exceed_the_vela_timeout(lease: float, timeout: float | None, ok: bool) -> None:
    vela = {} if timeout is None else {"timeout_seconds": timeout}
    raw = with_required(queue={"lease_seconds": lease}, vela=vela)
    if ok:
        assert parse(raw, {}).queue.lease_seconds == lease
    else:
        assert problems_of(raw, {}) == ["queue.lease_seconds: must exceed vela.timeout_seconds"]


def test_several_problems_are_reported_together() -> None:
    raw = {
        "server": {"port": "eighty"},
        "github": {"webhook_secrets": ["env:MISSING_SECRET"]},
        "vela": {"url": "not a URL"},
        "events": {"deployment": "both"},
        "queue": {"lease_seconds": 1},
        "colour": "blue",
    }
    problems = problems_of(raw, {})
    keys = sorted(p.split(": ")[0] for p in problems)
    assert keys == sorted(
        [
            "server.port",
            "github.webhook_secrets[0]",
            "vela.token",
            "vela.url",
            "events.deployment",
            "queue.lease_seconds",
            "colour",
        ]
    )


def test_credential_problems_come_with_the_others(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[github]\nwebhook_secrets = ["s"]\napp_id = 7\nreport_failures = true\n'
        '[vela]\ntoken = "t"\nurl = "not a URL"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    assert caught.value.problems == [
        "vela.url: not a URL",
        "github.app_id: needs github.private_key_file or github.private_key",
        "github.report_failures: needs a GitHub App (app_id and a private key) or github.token",
    ]


@pytest.mark.parametrize(
    "hooks",
    ['hooks = "octo-org/web.app"', '[[github.hooks]]\nrepo = "octo-org/web.app"'],
    ids=["not-a-table", "no-hook-id"],
)
def test_a_bad_hook_is_one_problem_not_a_credential_one_too(tmp_path: Path, hooks: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[github]\nwebhook_secrets = ["s"]\ntoken = "t"\nredeliver = true\n{hooks}\n')
    with pytest.raises(ConfigError) as caught:
        load(path, {"VELA_TOKEN": "t"})
    assert [p.split(":")[0] for p in caught.value.problems] in (
        ["github.hooks"],
        ["github.hooks[0].hook_id"],
    )


def test_a_credential_key_with_a_problem_is_not_reported_again(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[github]\nwebhook_secrets = ["s"]\napp_id = "x"\nprivate_key = "k"\nredeliver = true\n'
    )
    with pytest.raises(ConfigError) as caught:
        load(path, {"VELA_TOKEN": "t"})
    assert [p.split(":")[0] for p in caught.value.problems] == ["github.app_id"]


# -- secrets never show ---------------------------------------------------------------------------


def test_a_secret_never_shows_its_value() -> None:
    secret = Secret("hunter2")
    shown = [str(secret), repr(secret), f"{secret}", f"{secret!r}", "%s" % secret, str([secret])]  # noqa: UP031
    assert not any("hunter2" in text for text in shown)
    assert secret.value == "hunter2"
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b") and Secret("a") != "a"


def test_a_config_repr_shows_no_secret() -> None:
    env = {"NEW_WEBHOOK_SECRET": "new-secret", "APP_KEY": "-----BEGIN KEY-----"}
    config = parse(tomllib.loads(FULL), env)
    text = repr(config) + str(config)
    for value in [
        "old-secret",
        "new-secret",
        "BEGIN KEY",
        "ghp-file-token",
        "vela-file-token",
        "operator-file-token",
    ]:
        assert value not in text


SECRETS_IN_BAD_FILE = ["ws-secret-1", "vela-secret-2", "op-secret-3", "ghp-secret-4", "url-pw-5"]
BAD_FILE = """
colour = "blue"
webhook_secret = "ws-secret-1"

[server]
port = "eighty"

[github]
webhook_secrets = ["ws-secret-1", "env:NOT_SET_ANYWHERE"]
token = ["ghp-secret-4"]
api_url = "htp://user:url-pw-5@ghe.example.com"

[vela]
url = "not a URL"
token = "vela-secret-2"
tokn = "vela-secret-2"

[queue]
url = "mysql://bridge:url-pw-5@db/bridge"

[operator]
token = 12

[events]
deployment = "op-secret-3"
"""
BAD_FILE_KEYS = [
    "colour",
    "webhook_secret",
    "server.port",
    "github.webhook_secrets[1]",
    "github.token",
    "github.api_url",
    "vela.url",
    "vela.tokn",
    "queue.url",
    "operator.token",
    "events.deployment",
]


def test_config_errors_never_contain_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BAD_FILE)
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    assert sorted(p.split(": ")[0] for p in caught.value.problems) == sorted(BAD_FILE_KEYS)
    for value in SECRETS_IN_BAD_FILE:
        assert value not in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        'token = "abc\\q-toml-secret"',  # a bad escape inside the secret
        "token = toml-secret",  # unquoted
        'token = "toml-secret',  # unterminated
        '[vela]\ntoken = "toml-secret"\n[vela]\n',  # a table twice
    ],
)
def test_invalid_toml_errors_never_contain_a_secret(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(path, ENV)
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: not valid TOML")
    assert "toml-secret" not in problem


def test_an_unreadable_file_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "missing.toml", ENV)
    assert caught.value.problems == [
        f"{tmp_path / 'missing.toml'}: cannot be read (No such file or directory)"
    ]


# -- the command line --------------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything the config reads, plus ``extra``."""
    drop = {"VELA_TOKEN", "GITHUB_WEBHOOK_SECRET", "BRIDGE_OPERATOR_TOKEN"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def cli(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        cwd=cwd,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=30,
    )


GOOD_FILE = """
[github]
webhook_secrets = ["good-secret-1"]
[vela]
url = "https://vela.example.com"
token = "good-token-2"
"""


def test_version(tmp_path: Path) -> None:
    result = cli(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"vela-bridge {__version__}"


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    (tmp_path / "good.toml").write_text(GOOD_FILE)
    result = cli(tmp_path, "check-config", "--config", "good.toml")
    assert (result.returncode, result.stderr) == (0, "")
    assert "valid" in result.stdout
    assert "good-secret-1" not in result.stdout and "good-token-2" not in result.stdout


def test_check_config_prints_one_line_per_problem(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(BAD_FILE)
    result = cli(tmp_path, "check-config", "--config", "bad.toml")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert sorted(line.split(": ")[0] for line in lines) == sorted(BAD_FILE_KEYS)
    assert "vela.url: not a URL" in lines
    assert "Traceback" not in result.stderr
    assert "valid" not in result.stdout
    for value in SECRETS_IN_BAD_FILE:
        assert value not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("missing.toml", None, "cannot be read"),
        ("a-directory", "dir", "cannot be read"),
        ("broken.toml", '[vela\ntoken = "broken-secret"\n', "not valid TOML"),
        ("latin1.toml", b'[vela]\ntoken = "caf\xe9-broken-secret"\n', "not valid TOML"),
    ],
)
def test_check_config_on_an_unusable_file(
    tmp_path: Path, name: str, content: str | bytes | None, says: str
) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = cli(tmp_path, "check-config", "--config", name)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{name}: {says}")
    assert "Traceback" not in result.stderr and "broken-secret" not in result.stderr


def test_check_config_reads_config_toml_in_the_working_directory(tmp_path: Path) -> None:
    assert cli(tmp_path, "check-config", env=cli_env(**ENV)).returncode == 0
    (tmp_path / "config.toml").write_text('[vela]\nurl = "not a URL"\n')
    result = cli(tmp_path, "check-config", env=cli_env(**ENV))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["vela.url: not a URL"]


def test_check_config_with_neither_file_nor_env_names_the_required_keys(tmp_path: Path) -> None:
    result = cli(tmp_path, "check-config")
    assert result.returncode == 2
    assert sorted(line.split(": ")[0] for line in result.stderr.splitlines()) == [
        "github.webhook_secrets",
        "vela.token",
    ]


def test_serve_with_a_bad_config_exits_2_without_starting(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(BAD_FILE)
    checked = cli(tmp_path, "check-config", "--config", "bad.toml")
    port = _free_port()
    served = cli(tmp_path, "serve", "--config", "bad.toml", "--port", str(port))
    assert served.returncode == 2
    assert served.stderr == checked.stderr
    assert "listening" not in served.stdout + served.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.toml"]  # no queue file was opened
    for value in SECRETS_IN_BAD_FILE:
        assert value not in served.stdout + served.stderr


def start(cwd: Path, *args: str, env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", *args],
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_healthy(process: subprocess.Popen[str], url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("the bridge did not answer /healthz")


def stop(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err


def test_serve_without_config_uses_defaults_and_env(tmp_path: Path) -> None:
    port = _free_port()
    process = start(tmp_path, "--port", str(port), env=cli_env(**ENV))
    try:
        wait_healthy(process, f"http://127.0.0.1:{port}")
        assert (tmp_path / "vela-bridge.db").exists()  # the default queue, in the cwd
    finally:
        code, out, err = stop(process)
    # A clean shutdown; uvicorn re-raises the SIGTERM it handled, so -15 is clean too.
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in err
    [startup] = [line for line in err.splitlines() if "listening" in line]
    assert f"http://127.0.0.1:{port}" in startup
    assert "sqlite:///./vela-bridge.db" in startup
    assert "http://127.0.0.1:8080" in startup
    assert WEBHOOK_SECRET not in out + err and VELA_TOKEN not in out + err


@pytest.mark.parametrize(
    ("queue_url", "says"),
    [
        ("sqlite:///./not-a-database.db", "cannot open the SQLite queue"),
        ("postgresql://bridge:pg-password-7@127.0.0.1:9/bridge", "cannot open the PostgreSQL"),
    ],
    ids=["sqlite-not-a-database", "postgresql-down"],
)
def test_serve_that_cannot_open_its_queue_says_why_in_one_line(
    tmp_path: Path, queue_url: str, says: str
) -> None:
    if queue_url.startswith("postgresql"):
        pytest.importorskip("psycopg")
    (tmp_path / "not-a-database.db").write_bytes(b"plain text, not SQLite " * 20)
    (tmp_path / "q.toml").write_text(GOOD_FILE + f'[queue]\nurl = "{queue_url}"\n')
    result = cli(tmp_path, "serve", "--config", "q.toml", "--port", str(_free_port()))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if says in line]
    assert len(lines) == 1 and "cannot start: " in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "pg-password-7" not in result.stderr + result.stdout


def test_serve_startup_line_hides_a_queue_password(tmp_path: Path) -> None:
    (tmp_path / "pg.toml").write_text(
        GOOD_FILE + '[queue]\nurl = "postgresql://bridge:pg-password-6@127.0.0.1:9/bridge"\n'
    )
    process = start(tmp_path, "--config", "pg.toml", "--port", str(_free_port()), env=cli_env())
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # the start-up line comes before anything opens
    finally:
        _, out, err = stop(process)
    assert "listening" in first and "postgresql://" in first
    assert "pg-password-6" not in first + out + err
