"""The bridge's exception tree.

    BridgeError                     root: everything the bridge raises on purpose
    ├── ConfigError                 the configuration is unusable; .problems lists
    │                               one "key: what is wrong" line each
    ├── IntakeError                 a webhook request is refused; .status_code, .message
    │   └── PayloadError            the body is not a payload the mapping can read (400)
    ├── QueueError                  the durable queue cannot do what was asked
    │   ├── QueueUnavailable        it cannot be reached or cannot store (503 at intake)
    │   └── QueueLocked             another process owns the SQLite file
    ├── OperatorError               an operator API request cannot be served; .status_code
    │   ├── NotFound                no such repository, build or job (404)
    │   └── Conflict                not in a state that allows it (409)
    └── ForwardError                a Vela request did not succeed; .status_code is the
        │                           HTTP status (None for transport errors), .body an excerpt
        ├── Retryable               transport errors, timeouts, 408, 429, 5xx; .retry_after
        ├── Unauthorized            401/403: forwarding pauses, nothing is consumed
        └── Rejected                any other 4xx: final

Data lives in attributes, never only in the message, so callers branch on them.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class IntakeError(BridgeError):
    status_code = 400

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class PayloadError(IntakeError):
    """The payload lacks a key the mapping reads unconditionally, or has the wrong type."""

    status_code = 400


class QueueError(BridgeError):
    pass


class QueueUnavailable(QueueError):
    pass


class QueueLocked(QueueError):
    pass


class OperatorError(BridgeError):
    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(OperatorError):
    status_code = 404


class Conflict(OperatorError):
    status_code = 409


class ForwardError(BridgeError):
    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        body: str = "",
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.body = body
        # False only when the request certainly never reached Vela (connect failure).
        self.sent = sent


class Retryable(ForwardError):
    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class Unauthorized(ForwardError):
    pass


class Rejected(ForwardError):
    pass
