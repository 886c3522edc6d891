"""Vela's answers classified, retry waits, and the client against the fake Vela.

interface.md "Forwarding to Vela": what counts as success, a skip, a retry, a token
problem or a final rejection; how long a retry waits; which headers every request carries.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import __version__
from bridge.config import RetryConfig, Secret
from bridge.errors import ForwardError, Rejected, Retryable, Unauthorized
from bridge.forward import Backoff
from bridge.vela import Accepted, Skipped, VelaClient, classify, parse_retry_after
from tests.fakes.vela import FakeVela, Reply
from tests.support import VELA_TOKEN
from tests.test_forward import push

NOW = 1_732_262_400.0  # Fri, 22 Nov 2024 08:00:00 GMT
BUILD = {"id": 9001, "number": 42, "link": "https://vela.example.com/octo/web/42"}
NOT_ENABLED = "octo-org/web.app does not have push events enabled"  # Vela's api/build/create.go
T = TypeVar("T")


def http_date(when: float) -> str:
    return email.utils.formatdate(when, usegmt=True)


# -- classify: the table of interface.md ----------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
def test_a_build_object_is_accepted_with_number_and_link(status: int) -> None:
    text = json.dumps({**BUILD, "status": "pending", "commit": "abc"})
    answer = classify(status, text)
    assert isinstance(answer, Accepted)
    assert (answer.status, answer.number, answer.link) == (status, 42, BUILD["link"])
    assert '"number": 42' in answer.excerpt


def test_a_build_without_link_is_accepted_with_empty_link() -> None:
    answer = classify(201, json.dumps({"id": 1, "number": 7}))
    assert answer == Accepted(201, '{"id": 1, "number": 7}', number=7, link="")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"number": "42", "link": 5}', id="wrong-types"),
        pytest.param('{"number": true}', id="bool-is-not-a-number"),
        pytest.param('{"id": 7}', id="no-number"),
    ],
)
def test_a_2xx_object_without_a_usable_number_is_accepted_without_one(text: str) -> None:
    # Vela said it created something: sending again would duplicate it.
    answer = classify(201, text)
    assert isinstance(answer, Accepted)
    assert (answer.number, answer.link) == (None, "")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        pytest.param("[1, 2]", "[1, 2]", id="array"),
        pytest.param("created", "created", id="not-json"),
        pytest.param("<html><body>Sign in</body></html>", "<html>", id="a-proxy-login-page"),
        pytest.param("", "an empty body", id="empty"),
        pytest.param("42", "42", id="a-number"),
    ],
)
def test_a_2xx_that_is_not_a_build_is_unclear(text: str, shown: str) -> None:
    """Not Vela's answer: neither a success nor proof of none; retried after a lookup."""
    with pytest.raises(Retryable) as caught:
        classify(200, text)
    assert caught.value.message.startswith("Vela answered 200 without a build: ")
    assert shown in caught.value.message
    assert caught.value.sent is True


def test_a_json_string_is_velas_nothing_to_run() -> None:
    reason = "skipping build since only [skip ci] was found in the commit message"
    answer = classify(200, json.dumps(reason))
    assert answer == Skipped(200, json.dumps(reason), reason=reason)


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"error": f"unable to create new build: {NOT_ENABLED}"}),
        json.dumps({"error": "repo octo-org/web.app does not have pull_request events enabled"}),
        "repo octo-org/web.app does not have tag events enabled",
    ],
)
def test_a_400_event_not_enabled_is_skipped_with_velas_text(text: str) -> None:
    answer = classify(400, text)
    assert isinstance(answer, Skipped)
    assert answer.status == 400
    assert "does not have" in answer.reason and "events enabled" in answer.reason
    assert "{" not in answer.reason  # Vela's error text, not the JSON around it


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_a_token_problem(status: int) -> None:
    with pytest.raises(Unauthorized) as caught:
        classify(status, '{"error": "unable to parse token"}', "30", now=NOW)
    assert caught.value.status_code == status
    assert "unable to parse token" in caught.value.message
    assert not isinstance(caught.value, Retryable | Rejected)


@pytest.mark.parametrize(
    ("status", "maybe_created"),
    [
        # Vela may have created the build before answering 500 (its queue publish failed),
        # or a gateway answers after passing the request on (502, 504, Envoy's 503, a
        # CDN's 524): an unclear failure, look before re-sending.
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (524, True),
        # 408 and 429 refuse the request: it was not acted on.
        (408, False),
        (429, False),
    ],
)
def test_transient_statuses_are_retryable(status: int, maybe_created: bool) -> None:
    with pytest.raises(Retryable) as caught:
        classify(status, '{"error": "database is locked"}', now=NOW)
    assert caught.value.status_code == status
    assert caught.value.retry_after is None
    assert caught.value.sent is maybe_created
    assert "database is locked" in caught.value.message


def test_any_other_5xx_is_retryable() -> None:
    with pytest.raises(Retryable) as caught:
        classify(599, "", now=NOW)
    assert caught.value.status_code == 599
    assert caught.value.message == "Vela answered 599: HTTP 599"


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_in_seconds(status: int) -> None:
    with pytest.raises(Retryable) as caught:
        classify(status, "", "120", now=NOW)
    assert caught.value.retry_after == 120.0


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_as_http_date_is_relative_to_now(status: int) -> None:
    with pytest.raises(Retryable) as caught:
        classify(status, "", http_date(NOW + 90), now=NOW)
    assert caught.value.retry_after == pytest.approx(90.0)


@pytest.mark.parametrize(
    ("status", "text", "error"),
    [
        (400, '{"error": "unable to create build: invalid ref"}', "invalid ref"),
        (400, '{"error": "repo octo-org/web.app is not enabled"}', "is not enabled"),
        (404, '{"error": "unable to read repo octo-org/web.app: not found"}', "not found"),
        (404, "404 page not found", "404 page not found"),
        (405, "", "HTTP 405"),
        (409, '{"error": "build already exists"}', "build already exists"),
        (422, '{"error": "unprocessable"}', "unprocessable"),
        (451, "<html><body>Legal</body></html>", "<html><body>Legal</body></html>"),
    ],
)
def test_other_4xx_are_rejected_with_velas_error_text(status: int, text: str, error: str) -> None:
    with pytest.raises(Rejected) as caught:
        classify(status, text, "10", now=NOW)
    assert caught.value.status_code == status
    assert error in caught.value.message
    assert not isinstance(caught.value, Retryable)


def test_a_non_json_5xx_keeps_a_single_line_excerpt() -> None:
    page = "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body>\n</html>\n"
    with pytest.raises(Retryable) as caught:
        classify(502, page, now=NOW)
    assert (
        caught.value.body
        == "<html> <head><title>502 Bad Gateway</title></head> <body>nginx</body> </html>"
    )
    assert "\n" not in caught.value.message
    assert "502 Bad Gateway" in caught.value.message


def test_an_error_field_that_is_not_text_falls_back_to_the_body() -> None:
    with pytest.raises(Rejected) as caught:
        classify(400, '{"error": {"code": 7}}', now=NOW)
    assert '{"error": {"code": 7}}' in caught.value.message


@pytest.mark.parametrize("status", [201, 400, 500])
def test_the_excerpt_is_truncated_and_single_line(status: int) -> None:
    text = "line one\r\n\tline two\n" + "x" * 5000
    try:
        answer: Any = classify(status, text, now=NOW)
        excerpt = answer.excerpt
    except ForwardError as exc:
        excerpt = exc.body
        assert len(exc.message) < 400 and "\n" not in exc.message
    assert excerpt.startswith("line one line two x")
    assert len(excerpt) == 300
    assert excerpt.endswith("…")
    assert not any(c in excerpt for c in "\r\n\t")


def test_a_short_body_is_kept_whole() -> None:
    with pytest.raises(Rejected) as caught:
        classify(422, "x" * 300, now=NOW)
    assert caught.value.body == "x" * 300


# -- parse_retry_after ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("soon", None),
        ("0x10", None),
        ("Mon, 32 Foo 2024 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_parse_retry_after_dates() -> None:
    assert parse_retry_after(http_date(NOW + 3600), NOW) == pytest.approx(3600.0)
    assert parse_retry_after("Fri, 22 Nov 2024 08:00:30 GMT", NOW) == pytest.approx(30.0)
    # The obsolete RFC 850 and asctime forms are HTTP dates too.
    assert parse_retry_after("Friday, 22-Nov-24 08:01:00 GMT", NOW) == pytest.approx(60.0)
    # A date in the past means "now", never a negative wait.
    assert parse_retry_after(http_date(NOW - 600), NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    ["Fri Nov 22 08:01:00 2024", "Fri, 22 Nov 2024 08:01:00 -0000"],
    ids=["asctime", "-0000"],
)
def test_a_retry_after_date_without_a_zone_is_gmt_whatever_the_local_zone(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_retry_after(value, NOW) == pytest.approx(60.0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_parse_retry_after_never_negative() -> None:
    assert parse_retry_after("-30", NOW) in (None, 0.0)


def test_parse_retry_after_ignores_nan() -> None:
    assert parse_retry_after("nan", NOW) is None


@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value: str) -> None:
    seconds = parse_retry_after(value, NOW)
    assert seconds is None or seconds >= 0.0


# -- Backoff: the retry curve -------------------------------------------------------------


@pytest.mark.parametrize(("initial", "cap"), [(1.0, 900.0), (0.25, 30.0), (5.0, 5.0)])
def test_the_nth_retry_waits_the_curve_plus_up_to_25_percent(initial: float, cap: float) -> None:
    backoff = Backoff(
        RetryConfig(initial_backoff_seconds=initial, max_backoff_seconds=cap), random.Random(42)
    )
    jitters = []
    for n in range(1, 21):
        base = min(cap, initial * 2 ** (n - 1))
        for _ in range(20):
            wait = backoff.wait(n)
            assert base <= wait <= 1.25 * base, (n, wait)
            jitters.append((wait - base) / base)
    # The jitter is real: spread over its range, not always 0 or always 25 %.
    assert min(jitters) < 0.02 and max(jitters) > 0.23


def test_backoff_is_capped_for_huge_retry_numbers() -> None:
    backoff = Backoff(RetryConfig(initial_backoff_seconds=1, max_backoff_seconds=900))
    for n in (50, 1100, 10_000):
        assert 900 <= backoff.wait(n) <= 1125


def test_backoff_with_the_same_seed_is_the_same() -> None:
    config = RetryConfig()
    a, b = Backoff(config, random.Random(7)), Backoff(config, random.Random(7))
    assert [a.wait(n) for n in range(1, 11)] == [b.wait(n) for n in range(1, 11)]


def test_retry_after_replaces_the_wait_up_to_max_backoff() -> None:
    backoff = Backoff(
        RetryConfig(initial_backoff_seconds=1, max_backoff_seconds=60), random.Random(1)
    )
    assert backoff.wait(1, retry_after=17.0) == 17.0  # longer than the curve's 1 s
    assert backoff.wait(6, retry_after=2.0) == 2.0  # shorter than the curve's 32 s
    assert backoff.wait(3, retry_after=0.0) == 0.0
    assert backoff.wait(1, retry_after=3600.0) == 60.0
    assert backoff.wait(1, retry_after=float("inf")) == 60.0


# -- VelaClient against the fake Vela -------------------------------------------------------

PATH = "/api/v1/repos/octo-org/web.app/builds"


def request_body(**fields: Any) -> dict[str, Any]:
    return {
        "event": "push",
        "commit": "2deb7e0d0cbac357eeb110c8a2f2f32ce037e0d5",
        "ref": "refs/heads/main",
        "branch": "main",
        "source": "https://github.com/octo-org/web.app/commit/2deb7e0",
        **fields,
    }


def with_client(
    vela: FakeVela,
    use: Callable[[VelaClient], Awaitable[T]],
    *,
    timeout: float = 5.0,
    token: str = VELA_TOKEN,
    url: str | None = None,
) -> T:
    async def main() -> T:
        client = VelaClient(url or vela.url, Secret(token), timeout=timeout, connections=4)
        await client.open()
        try:
            return await use(client)
        finally:
            await client.close()

    return asyncio.run(main())


def send(
    vela: FakeVela, body: dict[str, Any], guid: str = "guid-1", **kwargs: Any
) -> Accepted | Skipped:
    raw = json.dumps(body).encode()
    return with_client(vela, lambda c: c.send(PATH, raw, guid), **kwargs)


def test_send_returns_the_fakes_build_and_sends_the_headers(vela: FakeVela) -> None:
    body = request_body()
    answer = send(vela, body, guid="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    assert answer == Accepted(
        201,
        answer.excerpt,
        number=1,
        link=f"{vela.url}/octo-org/web.app/1",
    )
    [post] = vela.posts()
    assert post.path == PATH
    assert post.body == body
    assert post.headers["Authorization"] == f"Bearer {VELA_TOKEN}"
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["User-Agent"] == f"vela-bridge/{__version__}"
    assert post.headers["X-GitHub-Delivery"] == "72d3162e-cc78-11e3-81ab-4c9367dc0958"


def test_a_trailing_slash_in_the_url_is_harmless(vela: FakeVela) -> None:
    answer = send(vela, request_body(), url=vela.url + "/")
    assert isinstance(answer, Accepted) and answer.number == 1
    assert vela.posts()[0].path == PATH


def test_send_numbers_builds_like_vela(vela: FakeVela) -> None:
    raw = json.dumps(request_body()).encode()

    async def three(client: VelaClient) -> list[Accepted | Skipped]:
        return [await client.send(PATH, raw, f"g{i}") for i in range(3)]

    answers = with_client(vela, three)
    assert [a.number for a in answers if isinstance(a, Accepted)] == [1, 2, 3]


def test_a_wrong_token_is_unauthorized(vela: FakeVela) -> None:
    with pytest.raises(Unauthorized) as caught:
        send(vela, request_body(), token="expired")
    assert caught.value.status_code == 401


def test_check_token_asks_vela_for_the_tokens_user(vela: FakeVela) -> None:
    """What a paused forwarder asks when it has no job to try the token with."""
    assert with_client(vela, lambda c: c.check_token()) is None  # taken
    with pytest.raises(Unauthorized) as refused:
        with_client(vela, lambda c: c.check_token(), token="expired")
    assert refused.value.status_code == 401
    assert [(r.method, r.path) for r in vela.requests] == [("GET", "/api/v1/user")] * 2
    vela.go_down()
    with pytest.raises(Retryable):  # tells neither way
        with_client(vela, lambda c: c.check_token())


def test_every_json_2xx_of_vela_says_the_token_was_taken(vela: FakeVela) -> None:
    """on_authorized (which ends a pause) follows every 2xx of Vela's, lookups included,
    and no other answer."""
    vela.script(Reply(503, {"error": "busy"}))
    raw = json.dumps(request_body()).encode()
    seen: list[str] = []

    async def use(client: VelaClient) -> None:
        client.on_authorized = lambda: seen.append("taken")
        with pytest.raises(Retryable):
            await client.send(PATH, raw, "g1")  # 503
        assert seen == []
        await client.send(PATH, raw, "g2")  # 201
        await client.find_build("octo-org", "web.app", request_body())  # 200
        assert not await client.deployment_exists("octo-org", "web.app", 1)  # 404
        await client.check_token()  # 200
        assert seen == ["taken"] * 3
        vela.token = "rotated"
        with pytest.raises(Unauthorized):
            await client.find_build("octo-org", "web.app", request_body())
        assert seen == ["taken"] * 3

    with_client(vela, use)


def test_a_scripted_503_with_retry_after_is_retryable(vela: FakeVela) -> None:
    vela.script(Reply(503, {"error": "maintenance"}, headers={"Retry-After": "45"}))
    with pytest.raises(Retryable) as caught:
        send(vela, request_body())
    assert (caught.value.status_code, caught.value.retry_after) == (503, 45.0)
    assert caught.value.sent is True  # a gateway's 503 may come after Vela made it


def test_a_scripted_event_not_enabled_is_skipped(vela: FakeVela) -> None:
    error = f"unable to create new build: {NOT_ENABLED}"
    vela.script(Reply(400, {"error": error}))
    answer = send(vela, request_body())
    assert answer == Skipped(400, answer.excerpt, reason=error)


def test_a_scripted_json_string_is_skipped(vela: FakeVela) -> None:
    vela.script(Reply(200, "no pipeline steps to run"))
    answer = send(vela, request_body())
    assert isinstance(answer, Skipped) and answer.reason == "no pipeline steps to run"


def test_a_redirect_is_not_followed(vela: FakeVela) -> None:
    """aiohttp would follow it as a GET and return the page: a false success."""
    login = "https://sso.example.com/login?state=s3cr3t&next=/api"
    vela.script(Reply(302, None, headers={"Location": login}))
    with pytest.raises(Retryable) as caught:
        send(vela, request_body())
    assert caught.value.message == (
        "Vela answered 302, a redirect to https://sso.example.com/login:"
        " set vela.url to the address Vela answers on"
    )
    assert caught.value.sent is False
    assert [(r.method, r.path) for r in vela.requests] == [("POST", PATH)]


def test_a_refused_connection_is_retryable_and_not_sent(vela: FakeVela) -> None:
    vela.go_down()
    with pytest.raises(Retryable) as caught:
        send(vela, request_body())
    assert caught.value.sent is False
    assert caught.value.status_code is None
    assert "connect" in caught.value.message


def find(vela: FakeVela, body: dict[str, Any], org: str = "octo-org", repo: str = "web.app") -> Any:
    return with_client(vela, lambda c: c.find_build(org, repo, body))


def test_a_timeout_is_retryable_maybe_sent_and_find_build_finds_it(vela: FakeVela) -> None:
    body = request_body()
    vela.script(Reply(create=True, delay=0.5))
    started = time.monotonic()
    with pytest.raises(Retryable) as caught:
        send(vela, body, timeout=0.1)
    assert caught.value.sent is True  # Vela may have created it: look before re-sending
    assert caught.value.status_code is None
    assert len(vela.builds["octo-org/web.app"]) == 1  # and it did

    found = find(vela, body)
    assert found == Accepted(200, found.excerpt, number=1, link=f"{vela.url}/octo-org/web.app/1")
    [get] = [r for r in vela.requests if r.method == "GET"]
    assert get.path == PATH
    assert get.query == {"commit": body["commit"], "event": "push"}
    assert get.headers["Authorization"] == f"Bearer {VELA_TOKEN}"
    # Let the fake's late answer go out, so no handler is left pending at the session's end.
    time.sleep(max(0.0, 0.55 - (time.monotonic() - started)))


def test_find_build_matches_source_and_ref(vela: FakeVela) -> None:
    main = request_body()
    feature = request_body(ref="refs/heads/feature", branch="feature")
    send(vela, main)  # build 1
    send(vela, feature)  # build 2: same commit and event, another ref
    assert find(vela, main).number == 1
    assert find(vela, feature).number == 2
    assert find(vela, request_body(source="https://github.com/fork/web.app/commit/2deb7e0")) is None
    assert find(vela, request_body(ref="refs/heads/other")) is None


def test_find_build_is_not_fooled_by_an_earlier_build_of_the_same_commit(vela: FakeVela) -> None:
    """A pull request's ``labeled`` build shares its commit with the ``opened`` one, and a
    commit pushed again has its earlier build: neither is what an unclear attempt made."""
    opened = request_body(event="pull_request", event_action="opened")
    send(vela, opened)  # build 1, created now
    labeled = request_body(event="pull_request", event_action="labeled")
    assert find(vela, labeled) is None
    assert find(vela, opened).number == 1

    def since(at: float) -> Any:
        return with_client(vela, lambda c: c.find_build("octo-org", "web.app", opened, at))

    assert since(time.time() + 60) is None  # made before this run was first claimed
    assert since(time.time() - 60).number == 1
    # An older Vela that records neither: the commit, event, source and ref decide.
    for build in vela.builds["octo-org/web.app"]:
        del build["event_action"], build["created"]
    assert find(vela, labeled).number == 1
    assert since(time.time() + 60).number == 1


def test_find_build_needs_commit_and_event_to_match(vela: FakeVela) -> None:
    send(vela, request_body())
    assert find(vela, request_body(commit="f" * 40)) is None
    assert find(vela, request_body(event="tag")) is None
    assert find(vela, request_body(), repo="other.app") is None


def test_find_build_when_vela_is_down_is_retryable(vela: FakeVela) -> None:
    vela.go_down()
    with pytest.raises(Retryable) as caught:
        find(vela, request_body())
    assert caught.value.sent is False


@pytest.mark.parametrize("status", [503, 524])
def test_a_gateway_5xx_after_vela_made_the_build_is_looked_up_not_sent_again(
    make_bridge: Any, vela: FakeVela, status: int
) -> None:
    """A gateway answers a 5xx once it has passed the request on (Envoy's 503 "upstream
    reset before headers", a CDN's 524): the build may exist, so one delivery must not
    become two builds."""
    bridge = make_bridge(retry={"initial_backoff_seconds": 0.1})
    gateway = {"error": "upstream connect error or disconnect/reset before headers"}
    vela.script(Reply(status, gateway, create=True))
    guid = "gateway-" + str(status)
    bridge.send("push", push(), guid=guid)
    stored = bridge.wait_status(guid, "success")
    assert len(vela.posts()) == 1  # looked up, found, not sent again
    assert [r.method for r in vela.requests] == ["POST", "GET"]
    assert sum(len(builds) for builds in vela.builds.values()) == 1
    assert stored["jobs"][0]["vela_number"] == 1
