"""Who the bridge is to GitHub: a GitHub App (JWT, installation tokens) or a plain token.

App mode (github.md "Credentials"): a JWT signed RS256 with the App's private key
(``iss`` = app id; gidgethub's ``apps.get_jwt`` backdates ``iat`` a minute for clock
drift and keeps it under GitHub's 10-minute cap) lists and redelivers the App's own
webhook deliveries; for a repository it is traded for an installation token
(``POST /app/installations/{id}/access_tokens``), cached until five minutes before
it expires. Token mode uses ``github.token`` for everything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import gidgethub.apps
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.config import GitHubConfig
from bridge.github.api import Credential, GitHubClient

TOKEN_REFRESH_MARGIN_SECONDS = 300.0  # renew an installation token this long before expiry
_JWT_REUSE_SECONDS = 300.0  # get_jwt's tokens last ~9 minutes; sign a new one after 5


class KeyProblem(Exception):
    """The App's private key is unusable; ``str()`` is the ``github.<key>: …`` line."""


def read_private_key(config: GitHubConfig) -> str:
    """The App's PEM private key, checked to be an RSA key; raise KeyProblem.

    Messages name the key and never quote the key's content.
    """
    if config.private_key is not None:
        key, pem = "github.private_key", config.private_key.value
    else:
        key = "github.private_key_file"
        try:
            pem = Path(config.private_key_file).read_text(encoding="ascii")
        except OSError as exc:
            reason = exc.strerror or exc.__class__.__name__
            raise KeyProblem(f"{key}: cannot be read ({reason})") from None
        except UnicodeDecodeError:
            raise KeyProblem(f"{key}: not a PEM file (it is not text)") from None
    try:
        loaded = serialization.load_pem_private_key(pem.encode("ascii", "replace"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyProblem(f"{key}: not an unencrypted RSA private key in PEM format") from None
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise KeyProblem(f"{key}: not an RSA key (GitHub Apps sign with RS256)")
    return pem


class Auth:
    """Credentials for each call, per github.md; installation tokens cached."""

    def __init__(
        self,
        config: GitHubConfig,
        client: GitHubClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._clock = clock
        self._app_id = config.app_id
        has_key = bool(config.private_key_file) or config.private_key is not None
        self._key = read_private_key(config) if has_key and config.app_id is not None else None
        self._token = config.token.value if config.token is not None else None
        self._jwt: tuple[str, float] | None = None
        self._installations: dict[int, tuple[str, float]] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    @property
    def is_app(self) -> bool:
        return self._app_id is not None and self._key is not None

    @property
    def mode(self) -> str:
        return "+".join(m for m, on in (("app", self.is_app), ("token", self.has_token)) if on)

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def app_jwt(self) -> Credential:
        """The App's JWT (re-signed every few minutes)."""
        assert self._app_id is not None and self._key is not None, "not in App mode"
        now = self._clock()
        if self._jwt is None or now - self._jwt[1] >= _JWT_REUSE_SECONDS:
            self._jwt = (
                gidgethub.apps.get_jwt(app_id=str(self._app_id), private_key=self._key),
                now,
            )
        return Credential("jwt", self._jwt[0], "app")

    def token(self) -> Credential:
        assert self._token is not None, "no github.token"
        return Credential("token", self._token, "token")

    async def installation(self, installation_id: int) -> Credential:
        """A cached installation token, renewed shortly before it expires."""
        bucket = f"installation {installation_id}"
        lock = self._locks.setdefault(installation_id, asyncio.Lock())
        async with lock:  # one renewal at a time per installation
            cached = self._installations.get(installation_id)
            if cached is None or cached[1] - self._clock() <= TOKEN_REFRESH_MARGIN_SECONDS:
                assert self._app_id is not None and self._key is not None, "not in App mode"
                cached = await self._client.installation_token(
                    installation_id, self._app_id, self._key
                )
                self._installations[installation_id] = cached
        return Credential("token", cached[0], bucket)

    def forget(self, installation_id: int) -> None:
        """Drop a cached token GitHub refused (revoked, or the App was reinstalled)."""
        self._installations.pop(installation_id, None)

    async def for_repository(self, installation_id: int | None) -> Credential | None:
        """App mode with the delivery's installation, else the token; None when neither."""
        if self.is_app and installation_id is not None:
            return await self.installation(installation_id)
        if self._token is not None:
            return self.token()
        return None
