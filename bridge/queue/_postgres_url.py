"""``queue.url`` for PostgreSQL: recognising it and showing it without its password.

Kept free of the driver so that the CLI can print a masked URL, and preflight can
say what is missing, without psycopg installed.

The password is found the way libpq reads a connection URI (``conninfo_uri_parse``
in fe-connect.c), not as :func:`urllib.parse.urlsplit` would: libpq's user
information runs up to the ``@`` before the first ``/``, so ``#`` and ``?`` are
ordinary password characters there; its query has no fragment either, so a
``?password=`` value runs up to the next ``&``, ``#`` included. Where the two
readings could differ, the wider one is masked.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

SCHEMES = ("postgresql://", "postgres://")
_MASK = "***"
# A host list as libpq accepts it: host[:port], comma-separated; IPv6 addresses in [].
_HOSTS = re.compile(r"(?:\[[^\]]*\]|[^:,\[\]]*)(?::\d*)?(?:,(?:\[[^\]]*\]|[^:,\[\]]*)(?::\d*)?)*")


def is_postgres(url: str) -> bool:
    return url.startswith(SCHEMES)


def masked(url: str) -> str:
    """The URL with any password (in the authority or as ``?password=``) replaced by ***."""
    shown = []
    last = 0
    for start, end in _secret_spans(url):
        shown += [url[last:start], _MASK]
        last = end
    return "".join([*shown, url[last:]])


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message, say) with the URL's password blanked out."""
    for secret in _passwords(url):
        text = text.replace(secret, _MASK)
    return text


def _passwords(url: str) -> list[str]:
    found = [url[start:end] for start, end in _secret_spans(url)]
    found += [raw.partition("@")[0] for raw in found]  # libpq's own reading of "p@ss@host"
    found += [unquote(raw) for raw in found]  # libpq decodes %XX (and only that: "+" stays)
    found += [quote(v, safe="") for v in found]
    # Longest first, so that a password containing another is replaced whole.
    return sorted({v for v in found if v}, key=len, reverse=True)


def _secret_spans(url: str) -> list[tuple[int, int]]:
    """Where the passwords are in ``url``, as (start, end) offsets in ascending order.

    The authority's is the text between the first ``:`` and the *last* ``@`` before
    the first ``/``: libpq stops at the first ``@``, but a password with an ``@``
    left unencoded must not show its tail. A ``/`` left unencoded in a password
    makes libpq see no user information at all (``u:p/ss@host``: a host ``u`` with
    a port ``p``); a port that is no number, followed later by an ``@``, is taken
    for such a password. Query parameters count when their (decoded) name contains
    "password": ``password`` and ``sslpassword`` (the client key's).
    """
    begin = url.find("://")
    if begin < 0:
        # Not a URL (a "key=value" connection string): show nothing of one that has a password.
        return [(0, len(url))] if "password" in url.lower() else []
    begin += 3
    slash = url.find("/", begin)
    authority_end = len(url) if slash < 0 else slash
    spans = []
    at = url.rfind("@", begin, authority_end)
    if at < 0 and slash >= 0 and not _HOSTS.fullmatch(url[begin:slash].partition("?")[0]):
        at = url.find("@", slash)
    if at >= 0:
        colon = url.find(":", begin, at)
        if colon >= 0:
            spans.append((colon + 1, at))
    query = url.find("?", max(at + 1, begin))
    if query >= 0:
        offset = query + 1
        for field in url[query + 1 :].split("&"):
            name, equals, _ = field.partition("=")
            if equals and "password" in unquote(name).lower():
                spans.append((offset + len(name) + 1, offset + len(field)))
            offset += len(field) + 1
    return spans
