"""``queue.url`` for PostgreSQL: recognising it and showing it without its password.

Kept free of the driver so that the CLI can print a masked URL, and preflight can
say what is missing, without psycopg installed.

The password is found the way libpq reads a connection URI (``conninfo_uri_parse``
in fe-connect.c), not as :func:`urllib.parse.urlsplit` would: libpq's user
information runs up to the first ``@`` before the first ``/``, so ``#`` and ``?``
are ordinary password characters there; its query has no fragment either, so a
``?password=`` value runs up to the next ``&``, ``#`` included. Where a URL can be
read more than one way (an ``@`` or ``/`` left unencoded), what is a password in
any of the readings is masked.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

SCHEMES = ("postgresql://", "postgres://")
_MASK = "***"
# A host list as libpq accepts it: host[:port], comma-separated; IPv6 addresses in [].
_HOSTS = re.compile(r"(?:\[[^\]]*\]|[^:,\[\]]*)(?::\d*)?(?:,(?:\[[^\]]*\]|[^:,\[\]]*)(?::\d*)?)*")
# Where libpq ends a host, a port, a database name or a query parameter.
_HOST_ENDS = re.compile(r"[:/?,&=\[\]]")


def is_postgres(url: str) -> bool:
    return url.startswith(SCHEMES)


def masked(url: str) -> str:
    """The URL with any password (in the authority or as ``?password=``) replaced by ***."""
    shown = []
    last = 0
    for start, end in sorted(_secret_spans(url)):
        if start < last:  # another reading of a password already masked
            last = max(last, end)
            continue
        shown += [url[last:start], _MASK]
        last = end
    return "".join([*shown, url[last:]])


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message, say) with the URL's password blanked out."""
    for secret in _passwords(url):
        text = text.replace(secret, _MASK)
    return text


def _passwords(url: str) -> list[str]:
    whole: set[str] = set()  # each reading's password
    parts: list[str] = []
    for start, end in _secret_spans(url):
        secret = url[start:end]
        # Past an "@" left unencoded, libpq reads the rest as a host ("p@ss@host": a
        # password "p" for a host "ss@host"), cut where a host, port or parameter ends:
        # an error names those parts, not the whole.
        first, *rest = secret.split("@")
        whole.add(secret)
        parts += [first, *rest, *(cut for part in rest for cut in _HOST_ENDS.split(part))]
    found = set()
    for raw in [*whole, *parts]:
        decoded = unquote(raw)  # libpq decodes %XX (and only that: "+" stays)
        # A fragment (either side of an "@") of one or two characters is never blanked:
        # a message is not worth destroying (every "p" in it) for a piece that reveals
        # nothing. A whole password is, however short.
        if decoded and (raw in whole or len(decoded) >= 3):
            found |= {raw, decoded, quote(raw, safe=""), quote(decoded, safe="")}
    # Longest first, so that a password containing another is replaced whole.
    return sorted(found, key=len, reverse=True)


def _secret_spans(url: str) -> list[tuple[int, int]]:
    """Where the passwords may be in ``url``, as (start, end) offsets; they may overlap.

    The authority's runs from the first ``:`` to the *last* ``@`` before the first
    ``/``. libpq stops at the first ``@`` (its password is the start of this one), but a
    password with an ``@`` left unencoded must not show its tail, nor must a user name
    holding one ("user@server", as Azure's) make the password look like a port. A ``/``
    left unencoded in a password makes libpq see no user information at all
    (``u:p/ss@host``: a host ``u`` with a port ``p``); a port that is no number,
    followed later by an ``@``, is taken for such a password.

    Query parameters count when their (decoded) name contains "password": ``password``
    and ``sslpassword`` (the client key's). libpq's query starts at the first ``?``
    after its user information, which may end at an ``@`` inside a ``?password=`` value;
    urllib's at the first ``?`` of all; a password may hold a ``?`` too: so every ``?``
    is taken for a start.
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
    query = url.find("?", begin)
    while query >= 0:
        offset = query + 1
        for field in url[offset:].split("&"):
            name, equals, _ = field.partition("=")
            if equals and "password" in unquote(name).lower():
                spans.append((offset + len(name) + 1, offset + len(field)))
            offset += len(field) + 1
        query = url.find("?", query + 1)
    return spans
