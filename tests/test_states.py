"""Job states, their legal transitions, and a delivery's status derived from its jobs."""

from __future__ import annotations

import itertools

import pytest

from bridge import states
from bridge.states import FINISHED, DeliveryStatus, IllegalTransition, JobState

P, RUN, RE = JobState.PENDING, JobState.RUNNING, JobState.RETRYING
OK, FAIL, KILL, SKIP = JobState.SUCCESS, JobState.FAILURE, JobState.KILLED, JobState.SKIPPED

# The rules of states.py's header comment, written out pair by pair:
# claim; settle a running attempt; cancel a waiting job; an operator restarts a finished one.
EXPECTED = {
    (P, RUN),
    (RE, RUN),
    (RUN, OK),
    (RUN, SKIP),
    (RUN, FAIL),
    (RUN, RE),
    (P, KILL),
    (RE, KILL),
    (OK, P),
    (FAIL, P),
    (KILL, P),
    (SKIP, P),
}
ALL_PAIRS = list(itertools.product(JobState, repeat=2))


def test_the_table_is_the_documented_rules() -> None:
    table = {(old, new) for old, targets in states.TRANSITIONS.items() for new in targets}
    assert table == EXPECTED
    assert set(states.TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(("old", "new"), ALL_PAIRS, ids=[f"{o}->{n}" for o, n in ALL_PAIRS])
def test_check_allows_exactly_the_table(old: JobState, new: JobState) -> None:
    if (old, new) in EXPECTED:
        states.check(old, new)  # does not raise
    else:
        with pytest.raises(IllegalTransition) as caught:
            states.check(old, new)
        assert (caught.value.old, caught.value.new) == (old, new)
        assert str(old) in str(caught.value) and str(new) in str(caught.value)


def test_illegal_transition_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="running job cannot become killed"):
        states.check(RUN, KILL)


def test_state_groups() -> None:
    assert {P, RUN, RE} == states.ACTIVE
    assert {OK, FAIL, KILL, SKIP} == states.FINISHED
    assert states.ACTIVE.isdisjoint(states.FINISHED)
    assert set(JobState) == states.ACTIVE | states.FINISHED
    assert {P, RE} == states.CLAIMABLE
    # Only what can be claimed becomes running; only what is running settles.
    assert {old for old, new in EXPECTED if new == RUN} == states.CLAIMABLE
    assert {new for old, new in EXPECTED if old == RUN} == {OK, SKIP, FAIL, RE}


def test_values_are_the_operator_api_words() -> None:
    assert [s.value for s in DeliveryStatus] == [
        "pending",
        "running",
        "success",
        "failure",
        "killed",
        "skipped",
    ]
    assert {s.value for s in JobState} == {s.value for s in DeliveryStatus} | {"retrying"}


@pytest.mark.parametrize(
    ("jobs", "status"),
    [
        pytest.param([], DeliveryStatus.SKIPPED, id="no-job-skipped-by-bridge"),
        pytest.param([P], DeliveryStatus.PENDING, id="one-pending"),
        pytest.param([P, P, P], DeliveryStatus.PENDING, id="all-pending"),
        pytest.param([RUN], DeliveryStatus.RUNNING, id="in-flight"),
        pytest.param([RE], DeliveryStatus.RUNNING, id="waiting-for-retry"),
        pytest.param([P, OK], DeliveryStatus.RUNNING, id="pending+success"),
        pytest.param([P, FAIL], DeliveryStatus.RUNNING, id="pending+failure"),
        pytest.param([RE, FAIL], DeliveryStatus.RUNNING, id="retrying+failure"),
        pytest.param([P, RE], DeliveryStatus.RUNNING, id="pending+retrying"),
        pytest.param([OK], DeliveryStatus.SUCCESS, id="success"),
        pytest.param([OK, OK], DeliveryStatus.SUCCESS, id="all-success"),
        pytest.param([FAIL], DeliveryStatus.FAILURE, id="failure"),
        pytest.param([OK, FAIL], DeliveryStatus.FAILURE, id="failure-beats-success"),
        pytest.param([KILL, FAIL], DeliveryStatus.FAILURE, id="failure-beats-killed"),
        pytest.param([OK, KILL, FAIL, SKIP], DeliveryStatus.FAILURE, id="failure-beats-all"),
        pytest.param([KILL], DeliveryStatus.KILLED, id="killed"),
        pytest.param([OK, KILL], DeliveryStatus.KILLED, id="killed-beats-success"),
        pytest.param([SKIP], DeliveryStatus.SKIPPED, id="skipped-by-vela"),
        pytest.param([SKIP, SKIP], DeliveryStatus.SKIPPED, id="all-skipped"),
        pytest.param([OK, SKIP], DeliveryStatus.SUCCESS, id="success+skipped"),
    ],
)
def test_delivery_status(jobs: list[JobState], status: DeliveryStatus) -> None:
    assert states.delivery_status(jobs) is status
    assert states.delivery_status(reversed(jobs)) is status  # order does not matter
    assert states.delivery_status(iter(jobs)) is status  # any iterable, read once


def test_delivery_status_is_finished_only_when_every_job_is() -> None:
    for jobs in itertools.product(JobState, repeat=3):
        status = states.delivery_status(jobs)
        active = any(j in states.ACTIVE for j in jobs)
        assert (status in (DeliveryStatus.PENDING, DeliveryStatus.RUNNING)) is active, jobs


@pytest.mark.parametrize(
    ("jobs", "error"),
    [
        pytest.param([], None, id="no-job: the bridge's skip reason stays"),
        pytest.param([(P, "")], "", id="pending"),
        pytest.param([(RE, "503")], "503", id="waiting-for-retry: its last error"),
        pytest.param([(RUN, "503")], "503", id="retried-in-flight: its last error"),
        pytest.param([(FAIL, "gave up"), (OK, "")], "gave up", id="failure-then-success"),
        pytest.param([(OK, ""), (FAIL, "gave up")], "gave up", id="success-then-failure"),
        pytest.param([(RE, "503"), (FAIL, "422")], "422", id="a-failure-before-a-retry"),
        pytest.param([(KILL, "cancelled"), (FAIL, "422")], "422", id="failure-beats-killed"),
        pytest.param([(SKIP, "off"), (KILL, "cancelled")], "cancelled", id="killed"),
        pytest.param([(SKIP, "off"), (SKIP, "none")], "off", id="all-skipped: the first reason"),
        pytest.param([(OK, ""), (SKIP, "off")], "", id="success+skipped: no error"),
        pytest.param([(OK, "")], "", id="success"),
        pytest.param([(FAIL, ""), (SKIP, "off")], "off", id="no-failure-text: the next"),
    ],
)
def test_delivery_error(jobs: list[tuple[JobState, str]], error: str | None) -> None:
    assert states.delivery_error(jobs) == error


def test_a_finished_deliverys_error_is_that_of_a_job_in_its_status() -> None:
    for found in itertools.product(FINISHED, repeat=3):
        jobs = [(state, f"error of {state}") for state in found]
        status = states.delivery_status(found)
        expected = "" if status is DeliveryStatus.SUCCESS else f"error of {status}"
        assert states.delivery_error(jobs) == expected, found
