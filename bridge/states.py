"""Job and delivery states, and the only transitions between them.

A *delivery* is one webhook GitHub sent; a *job* is one Vela request made for it
(operator-api.md: build and job). The rules:

- A job starts ``pending`` (never tried). A worker claims it: ``running``.
- A running job settles as ``success`` (Vela accepted it), ``skipped`` (Vela had
  nothing to run, or the event is not enabled for the repository), ``failure``
  (a permanent error, or retries exhausted) or ``retrying`` (a transient error:
  it waits for its next attempt). A claim released unfinished (shutdown, crash,
  a paused token) also goes back to ``retrying``, without consuming an attempt.
- A ``pending`` or ``retrying`` job may be cancelled: ``killed``. A running one
  may not: its attempt settles first (the operator retries the cancel).
- Any finished job (success, failure, killed, skipped) may be restarted by an
  operator: ``pending`` again.
- pending, running and retrying are *active*: an active job holds its lane
  (repository and ref, or repository and environment), so later jobs of the
  same lane wait behind it (interface.md "Order").

A delivery's status is derived from its jobs (:func:`delivery_status`); a
delivery with no job was skipped by the bridge itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import StrEnum


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCESS = "success"
    FAILURE = "failure"
    KILLED = "killed"
    SKIPPED = "skipped"


class DeliveryStatus(StrEnum):
    """The build ``status`` of operator-api.md."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"
    KILLED = "killed"
    SKIPPED = "skipped"


ACTIVE = frozenset({JobState.PENDING, JobState.RUNNING, JobState.RETRYING})
FINISHED = frozenset({JobState.SUCCESS, JobState.FAILURE, JobState.KILLED, JobState.SKIPPED})
CLAIMABLE = frozenset({JobState.PENDING, JobState.RETRYING})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.KILLED}),
    JobState.RETRYING: frozenset({JobState.RUNNING, JobState.KILLED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCESS, JobState.SKIPPED, JobState.FAILURE, JobState.RETRYING}
    ),
    JobState.SUCCESS: frozenset({JobState.PENDING}),
    JobState.FAILURE: frozenset({JobState.PENDING}),
    JobState.KILLED: frozenset({JobState.PENDING}),
    JobState.SKIPPED: frozenset({JobState.PENDING}),
}


class IllegalTransition(ValueError):
    def __init__(self, old: JobState, new: JobState) -> None:
        super().__init__(f"a {old} job cannot become {new}")
        self.old = old
        self.new = new


def check(old: JobState, new: JobState) -> None:
    """Raise :class:`IllegalTransition` unless ``old → new`` is one of :data:`TRANSITIONS`."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(old, new)


def delivery_status(jobs: Iterable[JobState]) -> DeliveryStatus:
    """The delivery's status from its jobs' states (operator-api.md ``status``)."""
    states = set(jobs)
    if not states:
        return DeliveryStatus.SKIPPED
    if states & {JobState.RUNNING, JobState.RETRYING}:
        return DeliveryStatus.RUNNING
    if JobState.PENDING in states:
        return DeliveryStatus.PENDING if states == {JobState.PENDING} else DeliveryStatus.RUNNING
    if JobState.FAILURE in states:
        return DeliveryStatus.FAILURE
    if JobState.KILLED in states:
        return DeliveryStatus.KILLED
    if states == {JobState.SKIPPED}:
        return DeliveryStatus.SKIPPED
    return DeliveryStatus.SUCCESS


# Whose error a delivery shows: a failure's before a cancel's, before the last error of a
# job still being retried, before the reason Vela skipped one.
_ERROR_FROM = (
    JobState.FAILURE,
    JobState.KILLED,
    JobState.RETRYING,
    JobState.RUNNING,
    JobState.SKIPPED,
)


def delivery_error(jobs: Sequence[tuple[JobState, str]]) -> str | None:
    """The delivery's ``error`` (operator-api.md) from its jobs' states and errors, in job
    order: the first error of the job that most decides its status, whichever job settled
    last; ``""`` once it succeeded. None for a delivery with no job: the bridge skipped it,
    and its error is the reason it gave then."""
    if not jobs:
        return None
    if delivery_status(state for state, _ in jobs) is DeliveryStatus.SUCCESS:
        return ""
    for wanted in _ERROR_FROM:
        for state, error in jobs:
            if state is wanted and error:
                return error
    return ""
