"""The operator CLI's side of the operator API: a small HTTP client and a table printer.

Standard library only (urllib): it runs on an operator's shell next to a bridge,
sends ``Authorization: Bearer <token>``, and turns every failure into one clear
line rather than a traceback.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from bridge import __version__
from bridge.config import redirect_target


class ClientError(Exception):
    """Something the operator must fix; ``str()`` is the one line to print."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error to show, not a request to follow: urllib would turn the
    replay's POST into a GET (restarting nothing) and send the token on to wherever it
    points, another host included."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


_opener = urllib.request.build_opener(_NoRedirect)


class OperatorClient:
    def __init__(self, url: str, token: str | None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def deliveries(self, repo: str | None, query: Mapping[str, str]) -> list[dict[str, Any]]:
        if repo:
            owner, _, name = repo.partition("/")
            path = f"/api/repos/{quote(owner, safe='')}/{quote(name, safe='')}/builds"
        else:
            path = "/api/deliveries"
        answer = self._call("GET", path, {k: v for k, v in query.items() if v})
        return answer if isinstance(answer, list) else []

    def replay(self, repo: str, number: int) -> dict[str, Any]:
        owner, _, name = repo.partition("/")
        path = f"/api/repos/{quote(owner, safe='')}/{quote(name, safe='')}/builds/{number}"
        answer = self._call("POST", path, {})
        return answer if isinstance(answer, dict) else {}

    def _call(self, method: str, path: str, query: Mapping[str, str]) -> Any:
        if not self._token:
            raise ClientError(
                "no operator token: set BRIDGE_OPERATOR_TOKEN or give --config with operator.token"
            )
        url = self.url + path + ("?" + urlencode(query) if query else "")
        request = urllib.request.Request(  # noqa: S310 - the operator's own bridge URL
            url,
            method=method,
            headers={
                "Authorization": f"Bearer {self._token}",
                "Accept": "application/json",
                "User-Agent": f"vela-bridge-cli/{__version__}",
            },
        )
        try:
            with _opener.open(request, timeout=self._timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                to = redirect_target(exc.headers.get("Location") or "")
                raise ClientError(
                    f"the bridge at {self.url} answered {exc.code}, a redirect to {to}:"
                    " give that address with --url"
                ) from None
            if exc.code == 401:
                raise ClientError(
                    f"the bridge at {self.url} refused the operator token"
                    " (check BRIDGE_OPERATOR_TOKEN or operator.token)"
                ) from None
            raise ClientError(f"{exc.code}: {_error_text(exc.read())}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach the bridge at {self.url} ({reason})") from None
        except ValueError:
            raise ClientError(f"{self.url} did not answer like a vela-bridge") from None


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:200]
    return str(data.get("error", data)) if isinstance(data, dict) else str(data)


def table(builds: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """A readable table of build objects, newest first as the API lists them."""
    now = time.time() if now is None else now
    header = ("REPO", "#", "STATUS", "EVENT", "DELIVERY", "AGE", "DETAIL")
    rows = [header]
    for b in builds:
        vela = b.get("vela_build")
        detail = str(b.get("error") or "")
        if not detail and isinstance(vela, dict):
            detail = f"vela build {vela.get('number')}"
        rows.append(
            (
                str(b.get("repo") or "-"),
                str(b.get("number") or "-"),
                str(b.get("status", "")),
                str(b.get("github_event", "")),
                str(b.get("delivery", "")),
                _age(now - float(b.get("created_at") or now)),
                detail if len(detail) <= 60 else detail[:59] + "…",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
