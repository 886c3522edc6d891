"""GitHub credentials: the config check, the App's JWT, installation tokens, start()."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import gidgethub.apps
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bridge.config import GitHubConfig, GitHubHook, Secret
from bridge.errors import ConfigError
from bridge.github import GitHubService, problems, start
from bridge.github.api import Credential, GitHubClient, retry_after
from bridge.github.auth import Auth, KeyProblem, read_private_key
from bridge.queue import open_queue
from tests.fakes.github import APP_ID, TOKEN, FakeGitHub, app_config, app_key

PEM = app_key()[0]
SECRETS = (Secret("webhook-secret"),)


def github(**values: Any) -> GitHubConfig:
    return GitHubConfig(webhook_secrets=SECRETS, **values)


def pem_file(tmp_path: Path, text: str, name: str = "app.pem") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_credentials_and_nothing_asked_is_fine() -> None:
    assert problems(github()) == []


def test_a_working_app_and_a_working_token_mode_are_fine(tmp_path: Path) -> None:
    app = github(app_id=1, private_key_file=pem_file(tmp_path, PEM), redeliver=True)
    assert problems(app) == []
    assert problems(github(app_id=1, private_key=Secret(PEM), report_failures=True)) == []
    token = github(
        token=Secret("t"), hooks=(GitHubHook(3, repo="o/r"),), redeliver=True, report_failures=True
    )
    assert problems(token) == []


def _ec_pem() -> str:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


def _encrypted_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ).decode()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"app_id": 1, "private_key_file": "/nonexistent/app.pem"},
            "github.private_key_file: cannot be read (No such file or directory)",
        ),
        (
            {"app_id": 1, "private_key": Secret("sk-very-secret-not-a-key")},
            "github.private_key: not an unencrypted RSA private key in PEM format",
        ),
        (
            {"app_id": 1, "private_key": Secret(_ec_pem())},
            "github.private_key: not an RSA key (GitHub Apps sign with RS256)",
        ),
        (
            {"app_id": 1, "private_key": Secret(_encrypted_pem())},
            "github.private_key: not an unencrypted RSA private key in PEM format",
        ),
        (
            {"app_id": 1, "redeliver": True},
            "github.app_id: needs github.private_key_file or github.private_key",
        ),
        ({"private_key": Secret(PEM)}, "github.private_key: needs github.app_id"),
        (
            {"private_key_file": "/x.pem", "private_key": Secret(PEM), "app_id": 1},
            "github.private_key: give private_key or private_key_file, not both",
        ),
        (
            {"hooks": (GitHubHook(1, repo="o/r"),)},
            "github.hooks: need github.token (hooks are watched in token mode)",
        ),
        (
            {"redeliver": True},
            "github.redeliver: needs a GitHub App (app_id and a private key)"
            " or github.token with [[github.hooks]]",
        ),
        (
            {"redeliver": True, "token": Secret("t")},
            "github.redeliver: needs a GitHub App (app_id and a private key)"
            " or github.token with [[github.hooks]]",
        ),
        (
            {"report_failures": True},
            "github.report_failures: needs a GitHub App (app_id and a private key) or github.token",
        ),
    ],
    ids=[
        "unreadable-file",
        "not-pem",
        "ec-key",
        "encrypted-key",
        "app-id-without-key",
        "key-without-app-id",
        "both-keys",
        "hooks-without-token",
        "redeliver-without-credentials",
        "redeliver-token-without-hooks",
        "report-without-credentials",
    ],
)
def test_problems_name_the_key(values: dict[str, Any], expected: str) -> None:
    assert expected in problems(github(**values))


def test_problems_never_print_a_secret(tmp_path: Path) -> None:
    secret = "-----BEGIN RSA PRIVATE KEY-----\nsk-very-secret\n-----END RSA PRIVATE KEY-----"
    lines = problems(github(app_id=1, private_key=Secret(secret), report_failures=True))
    lines += problems(github(app_id=1, private_key_file=pem_file(tmp_path, secret)))
    assert lines and not any("sk-very-secret" in line for line in lines)


def test_a_key_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "key.der"
    path.write_bytes(b"\x30\x82\xff\xfe" * 10)
    with pytest.raises(KeyProblem, match=r"^github\.private_key_file: not a PEM file"):
        read_private_key(github(app_id=1, private_key_file=str(path)))


def test_the_app_jwt_is_rs256_with_sane_claims_and_reused_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signed: list[str] = []
    real = gidgethub.apps.get_jwt

    def counting(**kwargs: Any) -> str:
        signed.append(kwargs["app_id"])
        return real(**kwargs)

    monkeypatch.setattr(gidgethub.apps, "get_jwt", counting)
    now = [time.time()]
    config = github(app_id=APP_ID, private_key=Secret(PEM))
    auth = Auth(config, GitHubClient(None, "http://127.0.0.1:1"), clock=lambda: now[0])  # type: ignore[arg-type]
    first = auth.app_jwt()
    claims = jwt.decode(first.value, app_key()[1], algorithms=["RS256"], issuer=str(APP_ID))
    assert jwt.get_unverified_header(first.value)["alg"] == "RS256"
    assert claims["iat"] <= time.time() and claims["exp"] <= time.time() + 600
    assert claims["exp"] - claims["iat"] <= 600
    assert auth.app_jwt() == first
    assert signed == [str(APP_ID)]
    now[0] += 301
    auth.app_jwt()
    assert signed == [str(APP_ID)] * 2


def test_credentials_never_show_their_value() -> None:
    credential = Credential("token", "ghs_secret", "installation 1")
    assert "ghs_secret" not in repr(credential) and "ghs_secret" not in str(credential)


def test_installation_tokens_come_from_the_app_jwt(tmp_path: Path) -> None:
    fake = FakeGitHub(public_key=app_key()[1]).start()
    try:

        async def go() -> list[Credential]:
            async with aiohttp.ClientSession() as session:
                client = GitHubClient(session, fake.url)
                auth = Auth(app_config(fake), client)
                return [
                    await auth.installation(1),
                    await auth.installation(1),
                    await auth.installation(2),
                ]

        one, again, two = asyncio.run(go())
    finally:
        fake.stop()
    assert one == again and one.value in fake.tokens and fake.tokens[two.value][0] == 2
    assert fake.rejected == []


@pytest.mark.parametrize(
    ("status", "headers", "message", "wait"),
    [
        (429, {"retry-after": "17"}, "", 17.0),
        (403, {"retry-after": "5"}, "secondary rate limit", 5.0),
        (403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1000600"}, "", 600.0),
        (403, {"x-ratelimit-remaining": "12", "x-ratelimit-reset": "1000600"}, "Forbidden", None),
        (403, {}, "You have exceeded a secondary rate limit", 60.0),
        (429, {}, "", 60.0),
        (429, {"retry-after": "Mon, 12 Jan 1970 13:46:50 GMT"}, "", 10.0),
        (429, {"retry-after": "999999"}, "", 3600.0),
        (429, {"retry-after": "0"}, "", 1.0),
        (404, {"retry-after": "5"}, "", None),
        (500, {}, "", None),
    ],
)
def test_retry_after(
    status: int, headers: dict[str, str], message: str, wait: float | None
) -> None:
    assert retry_after(status, headers, message, now=1_000_000.0) == wait


def test_a_retry_after_date_without_a_zone_is_gmt_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:  # 1_000_030 is Mon, 12 Jan 1970 13:47:10 GMT
        assert retry_after(429, {"retry-after": "Mon Jan 12 13:47:10 1970"}, "", 1_000_000.0) == 30
    finally:
        monkeypatch.undo()
        time.tzset()


def test_start_is_off_without_features_and_refuses_bad_credentials(tmp_path: Path) -> None:
    async def go() -> GitHubService:
        queue = await open_queue(
            f"sqlite:///{tmp_path / 'q.db'}", lease_seconds=60, retention_days=14
        )
        try:
            service = start(github(app_id=1, private_key=Secret(PEM)), queue)
            assert service.sweeper is None and service.reporter is None
            await service.close()
            with pytest.raises(ConfigError) as raised:
                start(github(redeliver=True, token=Secret(TOKEN)), queue)
            assert raised.value.problems[0].startswith("github.redeliver:")
            return service
        finally:
            await queue.close()

    asyncio.run(go())


def test_start_opens_and_closes_its_own_session(tmp_path: Path) -> None:
    fake = FakeGitHub(public_key=app_key()[1]).start()
    try:
        lost = fake.add_delivery({"ref": "refs/heads/main"}, status_code=0)

        async def go() -> None:
            queue = await open_queue(
                f"sqlite:///{tmp_path / 'q.db'}", lease_seconds=60, retention_days=14
            )
            try:
                config = app_config(fake, redeliver=True, report_failures=True)
                service = start(config, queue, first_sweep_delay=0)
                assert service.sweeper is not None and service.reporter is not None
                for _ in range(200):
                    if fake.redelivered():
                        break
                    await asyncio.sleep(0.01)
                await service.close()
            finally:
                await queue.close()

        asyncio.run(go())
        assert fake.redelivered() == [lost.guid]
    finally:
        fake.stop()
