"""Forwarding paused on a refused Vela token (interface.md "Forwarding to Vela").

A 401 or 403 fails nothing: forwarding pauses, /readyz names the cause, and the token
is tried again every ``vela.auth_retry_seconds``. This keeps why it is paused, when the
next try is due, and the spans it was paused, so that a job's age
(``retry.max_age_seconds``) leaves them out.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from bridge import observability as metrics

log = logging.getLogger("bridge.forward")

PROBE_SECONDS = 30.0
# The latest pauses kept to take out of jobs' ages: pauses are rare (a token expires), and
# a token that flaps must not grow the list without end.
_KEPT = 256


class Pause:
    def __init__(self, probe_seconds: float = PROBE_SECONDS) -> None:
        self.probe_seconds = probe_seconds
        self.reason: str | None = None  # None: not paused
        self._since = 0.0  # wall time the current pause began
        self._ended: deque[tuple[float, float]] = deque(maxlen=_KEPT)
        self._next_probe = 0.0  # on the monotonic clock

    def begin(self, reason: str) -> None:
        """Vela refused the token (again): paused, and the next try a full interval on."""
        metrics.FORWARDING_PAUSED.set(1)
        self._next_probe = time.monotonic() + self.probe_seconds
        if self.reason is None:
            self._since = time.time()
            log.warning(
                "forwarding paused: %s; trying again every %.0f s", reason, self.probe_seconds
            )
        self.reason = reason

    def end(self) -> bool:
        """Vela took the token: not paused any more. Whether it was."""
        if self.reason is None:
            return False
        self._ended.append((self._since, time.time()))
        metrics.FORWARDING_PAUSED.set(0)
        log.warning("forwarding resumed: Vela accepts the token again")
        self.reason = None
        return True

    def probe_wait(self) -> float:
        """Seconds until the token may be tried again; at 0 the try is the caller's, and
        the next is scheduled a full interval on. Wake-ups do not shorten it: a deadline."""
        wait = self._next_probe - time.monotonic()
        if wait <= 0:
            self._next_probe = time.monotonic() + self.probe_seconds
            return 0.0
        return wait

    def between(self, since: float, until: float) -> float:
        """Seconds of [since, until] (wall time) that forwarding was paused, as far as this
        process knows: a pause before a restart, or another replica's, is not known."""
        spans = [*self._ended]
        if self.reason is not None:
            spans.append((self._since, until))
        return sum(max(0.0, min(end, until) - max(start, since)) for start, end in spans)
