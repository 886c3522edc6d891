"""``X-Hub-Signature-256`` verification against every configured secret.

GitHub signs the raw request body with HMAC-SHA256 and sends
``sha256=<64 lowercase hex>`` (docs: "Validating webhook deliveries"). Only that
header counts: the legacy SHA-1 ``X-Hub-Signature`` is never accepted. Several
secrets may be configured side by side so that a secret can be rotated without
losing deliveries. Written here rather than delegated to gidgethub's
``Event.from_http`` (interface.md says why).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

_SHAPE = re.compile(rb"sha256=[0-9a-fA-F]{64}")


def verify(header: bytes | None, body: bytes, secrets: Sequence[bytes]) -> bool:
    """True when ``header`` is a well-formed SHA-256 signature of ``body`` by one of ``secrets``.

    ``header`` is the raw header value (bytes: a non-ASCII value is simply malformed).
    Every secret is tried, so the time taken does not tell which one matched.
    """
    if header is None or _SHAPE.fullmatch(header) is None:
        return False
    claimed = bytes.fromhex(header[7:].decode("ascii"))
    matched = False
    for secret in secrets:
        digest = hmac.digest(secret, body, "sha256")
        matched |= hmac.compare_digest(digest, claimed)
    return matched


def sign(body: bytes, secret: bytes) -> str:
    """The header value GitHub would send for ``body``; used by tests and the benchmark."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
