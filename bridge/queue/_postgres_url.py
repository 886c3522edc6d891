"""``queue.url`` for PostgreSQL: recognising it and showing it without its password.

Kept free of the driver so that the CLI can print a masked URL, and preflight can
say what is missing, without psycopg installed.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

SCHEMES = ("postgresql://", "postgres://")
_MASK = "***"


def is_postgres(url: str) -> bool:
    return url.startswith(SCHEMES)


def masked(url: str) -> str:
    """The URL with any password (in the authority or as ``?password=``) replaced by ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        userinfo, at, hostinfo = netloc.rpartition("@")
        if at and ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:{_MASK}@{hostinfo}"
        query = parts.query
        if "password" in query.lower():
            query = urlencode(
                [
                    (k, _MASK if k.lower() == "password" else v)
                    for k, v in parse_qsl(query, keep_blank_values=True)
                ],
                safe="*",
            )
        if (netloc, query) == (parts.netloc, parts.query):
            return url
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        # Not parseable as a URL: show only the scheme rather than risk a secret.
        return url.split("://", 1)[0] + "://" + _MASK


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message, say) with the URL's password blanked out."""
    for secret in _passwords(url):
        text = text.replace(secret, _MASK)
    return text


def _passwords(url: str) -> list[str]:
    found = []
    raw = re.search(r"://[^:/@?#]*:([^@/?#]*)@", url)
    if raw and raw.group(1):
        found += [raw.group(1), unquote(raw.group(1))]
    _, _, query = url.partition("?")
    found += [v for k, v in parse_qsl(query) if k.lower() == "password" and v]
    found += [quote(v, safe="") for v in found]
    # Longest first, so that a password containing another is replaced whole.
    return sorted(set(found), key=len, reverse=True)
